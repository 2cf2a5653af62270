//! The module layering, enforced: a module may use only modules in lower layers
//! (or its own layer's peers where the table allows). The scan reads every
//! `crate::<module>` path in `src/` (imports, qualified paths, and the string paths
//! serde attributes name), so an upward edge fails this test before review.
//! Cross-module references use `crate::` paths (`super::` stays inside a module).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first. Modules of one layer may not use each other.
const LAYERS: &[&[&str]] = &[
    &["domain", "crypto", "limits", "metrics"],
    &["keys"],
    &["store"],
    &["audit"],
    &["psp"],
    &["config"],
    &["telemetry", "tls"],
    &["service"],
    &["dev"],
    &["auth", "hardening"],
    &["api"],
    &["startup"],
    &["cli"],
];

/// Edges the layering alone would allow but the design forbids: (from, to, why).
type Forbidden<'a> = &'a [(&'a str, &'a str, &'a str)];
const FORBIDDEN: Forbidden<'static> = &[(
    "api",
    "store",
    "the API renders the service's views and errors, never the store's records",
)];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// (from, to) → the first place it occurs, for every cross-module reference in `source`.
fn references(from: &str, file: &str, source: &str, out: &mut BTreeMap<(String, String), String>) {
    for (n, line) in source.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `tokenvault::crate::…` does not exist; `$crate::` (macros) and `foo_crate::` are not ours.
            let before = rest[..i].chars().last();
            let ours = !matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '$');
            if ours && !name.is_empty() && name != from {
                out.entry((from.to_owned(), name))
                    .or_insert_with(|| format!("{file}:{}", n + 1));
            }
            rest = after;
        }
    }
}

/// Every violation: (from, to, where, why).
fn violations(edges: &BTreeMap<(String, String), String>, forbidden: Forbidden<'_>) -> Vec<String> {
    let mut bad = Vec::new();
    for ((from, to), at) in edges {
        let (Some(lf), Some(lt)) = (layer_of(from), layer_of(to)) else {
            bad.push(format!("{at}: {from} → {to}: a module missing from LAYERS"));
            continue;
        };
        if lt >= lf {
            bad.push(format!(
                "{at}: {from} (layer {lf}) uses {to} (layer {lt}): imports must point down"
            ));
        }
        if let Some((_, _, why)) = forbidden.iter().find(|(f, t, _)| f == from && t == to) {
            bad.push(format!("{at}: {from} uses {to}: {why}"));
        }
    }
    bad
}

fn scan(dir: &Path, root: &Path, out: &mut BTreeMap<(String, String), String>, modules: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scan(&path, root, out, modules);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(root).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
        // The crate root and the binaries sit above every module.
        if matches!(first, "lib.rs" | "main.rs" | "bin") {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_owned();
        modules.insert(module.clone());
        let source = std::fs::read_to_string(&path).unwrap();
        references(&module, &rel.display().to_string(), &source, out);
    }
}

#[test]
fn imports_point_down() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (mut edges, mut modules) = (BTreeMap::new(), BTreeSet::new());
    scan(&root, &root, &mut edges, &mut modules);
    let listed: BTreeSet<String> = LAYERS.iter().flat_map(|l| l.iter().map(|m| (*m).to_owned())).collect();
    assert_eq!(modules, listed, "every module of src/ has a layer, and only those");
    assert!(edges.len() > 40, "the scan found the crate's edges ({})", edges.len());
    let bad = violations(&edges, FORBIDDEN);
    assert!(bad.is_empty(), "upward or forbidden imports:\n{}", bad.join("\n"));
}

/// The checker itself: it catches an upward import, a qualified path, a serde
/// string path and a forbidden edge, and ignores comments and `$crate`.
#[test]
fn the_layering_check_catches_what_it_claims() {
    let mut edges = BTreeMap::new();
    references(
        "store",
        "store/x.rs",
        "use crate::domain::token::Token;\n\
         // crate::api in a comment\n\
         fn f() { let _ = crate::service::Vault::new; }\n\
         #[serde(deserialize_with = \"crate::api::extract::integral\")]\n\
         macro_rules! m { () => { $crate::cli::run() } }\n",
        &mut edges,
    );
    references("psp", "psp/x.rs", "use crate::config::PspSettings;", &mut edges);
    references("dev", "dev.rs", "use crate::keys::Keyring;", &mut edges);
    let found: Vec<_> = edges.keys().map(|(f, t)| format!("{f}→{t}")).collect();
    assert_eq!(
        found,
        ["dev→keys", "psp→config", "store→api", "store→domain", "store→service"]
    );
    let bad = violations(&edges, &[("dev", "keys", "a forbidden edge")]);
    assert_eq!(bad.len(), 4, "{bad:#?}");
    assert!(
        bad.iter()
            .any(|b| b.contains("store/x.rs:3: store (layer 2) uses service"))
    );
    assert!(bad.iter().any(|b| b.contains("store/x.rs:4: store (layer 2) uses api")));
    assert!(
        bad.iter()
            .any(|b| b.contains("psp/x.rs:1: psp (layer 4) uses config (layer 5)"))
    );
    assert!(
        bad.iter()
            .any(|b| b.contains("dev.rs:1: dev uses keys: a forbidden edge"))
    );
}
