//! What people type: `restore --at` points (`journal::pit::parse_point`, `parse_rfc3339`) and
//! the sizes and durations of command-line flags (`journal::units`). Any UTF-8 must give a value
//! or an error, never a panic; a parsed time must print and parse back to itself (to the second).
#![no_main]

use journal::pit::{format_time, parse_point, parse_rfc3339, Point};
use journal::units::{human_bytes, parse_duration, parse_size};
use libfuzzer_sys::fuzz_target;

const NOWS: [u64; 3] = [0, 1_795_000_000_000_000_000, u64::MAX];

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for now in NOWS {
        if let Ok(Point::Time(t)) = parse_point(s, now) {
            if s.trim().starts_with('-') {
                assert!(t <= now, "a relative point is in the past");
            }
        }
    }
    if let Some(t) = parse_rfc3339(s) {
        if t > 0 {
            let printed = format_time(t);
            assert_eq!(
                parse_rfc3339(&printed),
                Some(t - t % 1_000_000_000),
                "{s:?} -> {t} -> {printed:?}"
            );
        }
    }
    if let Ok(n) = parse_size(s) {
        let _ = human_bytes(n);
    }
    if let Ok(d) = parse_duration(s) {
        assert!(d.as_secs() < 1_000_000_000_000);
    }
});
