//! Shared by the benchmarks.

/// A distinct Luhn-valid 16-digit PAN for index `i` under a two-digit `prefix`.
pub fn luhn_pan(prefix: &str, i: u64) -> String {
    let body = format!("{prefix}{i:013}");
    (0..10)
        .map(|d| format!("{body}{d}"))
        .find(|c| {
            let s: u32 = c
                .bytes()
                .rev()
                .enumerate()
                .map(|(i, b)| {
                    let d = u32::from(b - b'0');
                    if i % 2 == 1 {
                        if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
                    } else {
                        d
                    }
                })
                .sum();
            s.is_multiple_of(10)
        })
        .unwrap_or_default()
}
