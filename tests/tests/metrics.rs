//! Live numbers: `--metrics` on nbd-proxy and `replicator serve`, scraped over HTTP and parsed
//! by the Prometheus project's own parser, agree with what `status` says; status shows
//! nonzero rates while a real client writes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tests::cdp::*;
use tests::{make_image, wait_for};

const MIB: u64 = 1 << 20;
const CAUGHT_UP: Duration = Duration::from_secs(120);

fn replicator_status(rep: &Replicator) -> serde_json::Value {
    let store = rep.store.display().to_string();
    let (ok, out) = cli("replicator", &["status", "--store", &store, "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

#[test]
fn metrics_endpoints_parse_and_agree_with_status() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let rep_metrics = format!("127.0.0.1:{}", free_port());
    let proxy_metrics = format!("127.0.0.1:{}", free_port());
    let rep = Replicator::start(
        &dir.path().join("store"),
        &[
            "--metrics",
            &rep_metrics,
            "--retention",
            "1h",
            "--max-store-size",
            "1GiB",
        ],
    )
    .unwrap();
    let mut proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("disk", &image)],
        &["--metrics", &proxy_metrics],
    );
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    qemu_io(
        &proxy.uri("disk"),
        &["write -P 0x5a 0 1M", "write -P 0x11 2M 64k", "flush"],
    );
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();

    // Scrapes render a snapshot taken 4 times a second, and status.json is rewritten once a
    // second: poll until both sides say the same of the same quiet moment.
    let g = [("group", "g")];
    let mut last = String::new();
    let (status, rstatus, p, r) = wait_for("metrics that agree with status", CAUGHT_UP, || {
        let status = proxy_status(&ctl).ok()?;
        let rstatus = replicator_status(&rep);
        let p = scrape(&proxy_metrics).unwrap();
        let r = scrape(&rep_metrics).unwrap();
        let pairs = [
            (p.get("nbd_proxy_captured_seq", &g), &status["captured_seq"]),
            (p.get("nbd_proxy_durable_seq", &g), &status["durable_seq"]),
            (
                p.get("nbd_proxy_records_total", &g),
                &status["captured_seq"],
            ),
            (
                p.get("nbd_proxy_records_acked_total", &g),
                &status["durable_seq"],
            ),
            (
                p.get("nbd_proxy_shipped_bytes_total", &g),
                &status["bytes_shipped"],
            ),
            (
                p.get("nbd_proxy_guest_writes_total", &g),
                &status["guest_writes"],
            ),
            (r.get("replicator_durable_seq", &g), &status["durable_seq"]),
            (r.get("replicator_durable_seq", &g), &rstatus["durable_seq"]),
            (
                r.get("replicator_records_ingested_total", &g),
                &rstatus["durable_seq"],
            ),
            (
                r.get("replicator_fsyncs_total", &g),
                &rstatus["live"]["fsyncs"],
            ),
            (
                r.get("replicator_store_size_bytes", &g),
                &rstatus["store_bytes"],
            ),
        ];
        last = format!("{pairs:?}");
        pairs
            .iter()
            .all(|(m, s)| s.as_f64() == Some(*m))
            .then_some((status, rstatus, p, r))
    })
    .unwrap_or_else(|e| panic!("{e}: (metric, status) pairs {last}"));

    // The proxy's endpoint, as Prometheus reads it.
    assert!(
        p.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        p.content_type
    );
    for f in p.families.iter().chain(&r.families) {
        assert!(f["help"].as_str().is_some_and(|h| !h.is_empty()), "{f}");
        assert!(f["type"] == "counter" || f["type"] == "gauge", "{f}");
    }
    assert_eq!(
        p.family("nbd_proxy_records_total").unwrap()["type"],
        "counter"
    );
    assert_eq!(p.family("nbd_proxy_captured_seq").unwrap()["type"], "gauge");
    assert!(status["captured_seq"].as_u64() >= Some(3), "{status:#}");
    assert_eq!(status["records"], status["captured_seq"]);
    assert_eq!(p.get("nbd_proxy_guest_writes_total", &g), 2.0);
    assert_eq!(
        p.get("nbd_proxy_guest_write_bytes_total", &g),
        (MIB + 64 * 1024) as f64
    );
    assert_eq!(status["guest_write_bytes"], MIB + 64 * 1024);
    assert!(p.get("nbd_proxy_shipped_bytes_total", &g) > 0.0);
    for (name, want) in [
        ("nbd_proxy_link_connected", 1.0),
        ("nbd_proxy_link_connects_total", 1.0),
        ("nbd_proxy_tracking_live", 1.0),
        ("nbd_proxy_sync_running", 0.0),
        ("nbd_proxy_sync_degraded", 0.0),
        // The store shares the image's disk (both in one temporary directory).
        ("nbd_proxy_writeback_swept", 1.0),
        ("nbd_proxy_dirty_bytes", 0.0),
        ("nbd_proxy_dirty_chunks", 0.0),
        ("nbd_proxy_lag_records", 0.0),
        ("nbd_proxy_lag_bytes", 0.0),
        ("nbd_proxy_lag_seconds", 0.0),
        ("nbd_proxy_change_log_used_bytes", 0.0),
        ("nbd_proxy_change_log_capacity_bytes", 256.0 * MIB as f64),
        ("nbd_proxy_syncs_completed_total", 1.0),
    ] {
        assert_eq!(p.get(name, &g), want, "{name}:\n{}", p.text);
    }
    assert_eq!(
        p.get("nbd_proxy_change_log_capacity_bytes", &g),
        status["log_capacity"].as_f64().unwrap()
    );
    let p99 = p.get("nbd_proxy_lag_p99_seconds", &g);
    assert!((p99 - status["lag_p99_ms"].as_f64().unwrap() / 1000.0).abs() < 1e-9);
    assert!(p99 > 0.0 && p.get("nbd_proxy_lag_max_seconds", &g) >= p99);
    let path = image.display().to_string();
    assert_eq!(
        p.get(
            "nbd_proxy_disk_size_bytes",
            &[("group", "g"), ("disk", "disk"), ("path", &path)]
        ),
        (16 * MIB) as f64
    );
    assert_eq!(
        p.get(
            "nbd_proxy_info",
            &[
                ("mode", "async"),
                ("on_full", "bitmap"),
                ("replicator", &rep.addr)
            ]
        ),
        1.0
    );

    // The replicator's.
    assert!(r.content_type.starts_with("text/plain; version=0.0.4"));
    assert_eq!(
        r.family("replicator_fsyncs_total").unwrap()["type"],
        "counter"
    );
    assert!(r.get("replicator_fsyncs_total", &g) >= 1.0);
    assert_eq!(
        r.get("replicator_ingested_bytes_total", &g),
        rstatus["live"]["bytes_in"].as_f64().unwrap()
    );
    assert!(r.get("replicator_ingested_bytes_total", &g) >= (MIB + 64 * 1024) as f64);
    assert_eq!(
        r.get("replicator_stored_bytes_total", &g),
        rstatus["live"]["stored_in"].as_f64().unwrap()
    );
    for (name, want) in [
        ("replicator_proxy_connected", 1.0),
        ("replicator_store_failed", 0.0),
        ("replicator_damaged", 0.0),
    ] {
        assert_eq!(r.get(name, &g), want, "{name}:\n{}", r.text);
    }
    assert_eq!(r.get("replicator_retention_seconds", &[]), 3600.0);
    assert_eq!(
        r.get("replicator_max_store_size_bytes", &[]),
        (1024 * MIB) as f64
    );
    assert_eq!(r.get("replicator_connections", &[]), 1.0);
    let newest = rstatus["newest_time_ns"].as_f64().unwrap() / 1e9;
    assert!((r.get("replicator_durable_timestamp_seconds", &g) - newest).abs() < 1e-3);
    assert!(r.get("replicator_last_ingest_timestamp_seconds", &g) >= newest - 1e-3);

    // Only /metrics is served.
    for addr in [&proxy_metrics, &rep_metrics] {
        assert_eq!(http_status(addr, "/").unwrap(), 404);
        assert_eq!(http_status(addr, "/metrics/other").unwrap(), 404);
        assert_eq!(http_status(addr, "/metrics?from=test").unwrap(), 200);
    }
    proxy.stop().unwrap();
    rep.assert_no_errors_but(&[]).unwrap();
}

#[test]
fn status_shows_rates_while_a_client_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let mut proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &[]);
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, uri) = (stop.clone(), proxy.uri("disk"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                qemu_io(&uri, &["write -P 0x33 0 4M", "write -P 0x44 4M 4M"]);
            }
        })
    };
    let mut last = serde_json::Value::Null;
    let rates = wait_for("nonzero rates in nbd-proxy status", CAUGHT_UP, || {
        let s = proxy_status(&ctl).ok()?;
        let r = s["rates"]["10s"].clone();
        last = s;
        [
            "guest_write_iops",
            "guest_write_bytes_per_s",
            "records_captured_per_s",
            "records_acked_per_s",
            "bytes_shipped_per_s",
        ]
        .iter()
        .all(|k| r[k].as_f64() > Some(0.0))
        .then_some(r)
    })
    .unwrap_or_else(|e| panic!("{e}; last status {last:#}"));
    assert!(rates["seconds"].as_f64() > Some(0.0), "{rates}");
    let rates = wait_for("nonzero rates in replicator status", CAUGHT_UP, || {
        let r = replicator_status(&rep)["live"]["rates"]["10s"].clone();
        last = r.clone();
        ["records_per_s", "bytes_per_s", "fsyncs_per_s"]
            .iter()
            .all(|k| r[k].as_f64() > Some(0.0))
            .then_some(r)
    })
    .unwrap_or_else(|e| panic!("{e}; last rates {last:#}"));
    assert!(rates["seconds"].as_f64() > Some(0.0), "{rates}");

    // And for people.
    let (ok, out) = cli(
        "nbd-proxy",
        &["status", "--control", &ctl.display().to_string()],
    );
    assert!(ok, "{out}");
    assert!(out.contains("rates       last "), "{out}");
    assert!(
        out.contains("writes/s") && out.contains("acknowledged; shipped"),
        "{out}"
    );
    let store = rep.store.display().to_string();
    let (ok, out) = cli("replicator", &["status", "--store", &store]);
    assert!(ok, "{out}");
    assert!(out.contains("  rates       last "), "{out}");
    assert!(
        out.contains("records/s") && out.contains("fsyncs/s"),
        "{out}"
    );

    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    proxy.stop().unwrap();

    // --metrics reports replication: without --replicate it is refused at start.
    let (ok, out) = cli(
        "nbd-proxy",
        &[
            "--disk",
            &format!("d={}", image.display()),
            "--socket",
            &dir.path().join("other.sock").display().to_string(),
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    assert!(!ok && out.contains("--metrics needs --replicate"), "{out}");
}
