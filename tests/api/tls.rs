//! TLS and mutual TLS with client-certificate pinning, through the real binary:
//! certificates from a test CA (rcgen); the edge client is pinned to one
//! certificate's SPKI, so its JWT alone is not enough.

use serde_json::json;

use crate::cli::{prod_layout, unseal_with};
use crate::helpers::*;

struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key: String,
    edge: (String, String, [u8; 32]),
    other: (String, String),
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tokenvault test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let client = |cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        (
            cert.pem(),
            key.serialize_pem(),
            tokenvault::tls::spki_sha256(cert.der()).unwrap(),
        )
    };
    let edge = client("ivr-edge");
    let other = client("someone-else");
    Pki {
        ca_pem: ca.pem(),
        server_pem: server.pem(),
        server_key: server_key.serialize_pem(),
        edge,
        other: (other.0, other.1),
    }
}

fn https_client(pki: &Pki, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap());
    if let Some((cert, key)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test]
async fn mutual_tls_enforces_the_registry_pin() {
    let dev = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = pki();
    for (name, body) in [
        ("ca.pem", &pki.ca_pem),
        ("server.pem", &pki.server_pem),
        ("server.key", &pki.server_key),
    ] {
        std::fs::write(d.join(name), body).unwrap();
    }
    let dd = d.display();
    let config = prod_layout(&dev, d)
        .replace(
            "[tls]\nmode = \"upstream\"",
            &format!(
                "[tls]\nmode = \"native\"\ncert_file = \"{dd}/server.pem\"\nkey_file = \"{dd}/server.key\"\nclient_ca_file = \"{dd}/ca.pem\"\n"
            ),
        )
        .replacen(
            "sub = \"dev-edge\"\nscopes = [\"tokens:create\"]\ntenants = [\"acme\"]",
            &format!(
                "sub = \"dev-edge\"\nscopes = [\"tokens:create\"]\ntenants = [\"acme\"]\ncert_sha256 = \"{}\"",
                hex::encode(pki.edge.2)
            ),
            1,
        );
    assert!(config.contains("cert_sha256"));
    let cfg = d.join("tokenvault.toml");
    std::fs::write(&cfg, &config).unwrap();
    let prod = TestApp::start(&["serve", "--config", cfg.to_str().unwrap()], d.join("data"));
    assert!(prod.base.starts_with("https://"), "{}", prod.base);
    let probe = https_client(&pki, None).get(prod.url("/healthz")).send().await;
    assert!(probe.is_ok(), "{probe:?}\n{}", prod.logs());
    for share in [1, 2] {
        let (code, _, err) = unseal_with(&prod, &dev, d, &d.join(format!("shares/share-{share}.txt")));
        assert_eq!(code, 0, "{err}");
    }

    let body = json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2031});
    prod.watch("4111111111111111");
    let edge_jwt = dev.jwt("edge", "acme");
    let tokenize = |client: reqwest::Client| {
        let (url, jwt, body) = (prod.url("/v1/tokens"), edge_jwt.clone(), body.clone());
        async move { client.post(url).bearer_auth(jwt).json(&body).send().await }
    };
    // The pinned edge: its JWT without its certificate is refused; another valid
    // certificate from the same CA is refused; its own certificate works.
    let res = tokenize(https_client(&pki, None)).await.unwrap();
    let p = assert_problem(res, 403, "forbidden").await;
    assert!(p["detail"].as_str().unwrap().contains("client certificate"), "{p}");
    let res = tokenize(https_client(&pki, Some((&pki.other.0, &pki.other.1))))
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;
    let res = tokenize(https_client(&pki, Some((&pki.edge.0, &pki.edge.1))))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        prod.metric_via(
            &https_client(&pki, None),
            "tokenvault_auth_failures_total{reason=\"client_cert\"}"
        )
        .await,
        2.0
    );
    // Plain HTTP to the TLS port does not work; an untrusted server certificate is refused by clients.
    let plain = prod.base.replace("https://", "http://");
    let plain_client = reqwest::Client::builder().no_proxy().build().unwrap();
    let plain_ok = plain_client
        .get(format!("{plain}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    assert!(!plain_ok, "plain HTTP must not be served on the TLS port");
    let untrusting = reqwest::Client::builder().no_proxy().use_rustls_tls().build().unwrap();
    assert!(untrusting.get(prod.url("/healthz")).send().await.is_err());
}
