#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use super::*;

#[test]
fn families_are_written_once_with_help_and_type() {
    let mut e = Exposition::default();
    e.counter("x_records_total", "Records.", &[("group", "a")], 3u64);
    e.gauge("x_seq", "Seq.", &[("group", "a")], 7u64);
    e.counter("x_records_total", "Records.", &[("group", "b")], 4u64);
    e.gauge("x_up", "Up.", &[], true);
    assert_eq!(
        e.render(),
        "# HELP x_records_total Records.\n\
         # TYPE x_records_total counter\n\
         x_records_total{group=\"a\"} 3\n\
         x_records_total{group=\"b\"} 4\n\
         # HELP x_seq Seq.\n\
         # TYPE x_seq gauge\n\
         x_seq{group=\"a\"} 7\n\
         # HELP x_up Up.\n\
         # TYPE x_up gauge\n\
         x_up 1\n"
    );
}

#[test]
fn label_values_and_help_are_escaped() {
    assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
    assert_eq!(escape_label("two\nlines"), "two\\nlines");
    assert_eq!(escape_label("plain é"), "plain é");
    let mut e = Exposition::default();
    e.gauge(
        "x_info",
        "Back\\slash and\nnewline; \"quotes\" stay.",
        &[("path", "/a \"b\"\\c\n"), ("mode", "sync")],
        1u64,
    );
    assert_eq!(
        e.render(),
        "# HELP x_info Back\\\\slash and\\nnewline; \"quotes\" stay.\n\
         # TYPE x_info gauge\n\
         x_info{path=\"/a \\\"b\\\"\\\\c\\n\",mode=\"sync\"} 1\n"
    );
}

#[test]
fn values_are_written_as_prometheus_reads_them() {
    assert_eq!(Value::from(u64::MAX).to_string(), "18446744073709551615");
    assert_eq!(Value::from(0.0004).to_string(), "0.0004");
    assert_eq!(Value::from(2.0).to_string(), "2");
    assert_eq!(Value::from(f64::NAN).to_string(), "NaN");
    assert_eq!(Value::from(f64::INFINITY).to_string(), "+Inf");
    assert_eq!(Value::from(f64::NEG_INFINITY).to_string(), "-Inf");
    assert_eq!(Value::from(false).to_string(), "0");
}

#[test]
#[should_panic(expected = "must end in _total")]
fn a_counter_without_total_is_a_bug() {
    Exposition::default().counter("x_records", "Records.", &[], 1u64);
}

#[test]
#[should_panic(expected = "metric name")]
fn a_bad_name_is_a_bug() {
    Exposition::default().gauge("2x-y", "Bad.", &[], 1u64);
}

#[test]
fn names() {
    assert!(valid_name("nbd_proxy_lag_seconds"));
    assert!(valid_name("_x:y"));
    assert!(!valid_name(""));
    assert!(!valid_name("9a"));
    assert!(!valid_name("a-b"));
}

fn body() -> String {
    "x 1\n".into()
}

#[test]
fn only_get_metrics_renders() {
    let r = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n", &body);
    assert_eq!(
        (r.status, r.content_type, r.body.as_str()),
        (200, CONTENT_TYPE, "x 1\n")
    );
    assert_eq!(respond(b"GET /metrics?x=1 HTTP/1.0", &body).status, 200);
    assert_eq!(respond(b"GET / HTTP/1.1", &body).status, 404);
    assert_eq!(respond(b"GET /metrics/ HTTP/1.1", &body).status, 404);
    assert_eq!(respond(b"GET /metricsx HTTP/1.1", &body).status, 404);
    assert_eq!(respond(b"POST /metrics HTTP/1.1", &body).status, 405);
    assert_eq!(respond(b"GET /metrics", &body).status, 400);
    assert_eq!(respond(b"GET /metrics SPDY/3", &body).status, 400);
    assert_eq!(respond(b"\xff\xfe", &body).status, 400);
    assert_eq!(respond(b"", &body).status, 400);
}

#[test]
fn replies_close_and_say_their_length() {
    let r = respond(b"GET /metrics HTTP/1.1", &body);
    let text = String::from_utf8(r.bytes()).unwrap();
    assert_eq!(
        text,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: 4\r\nConnection: close\r\n\r\nx 1\n"
    );
    let text = String::from_utf8(respond(b"PUT /metrics HTTP/1.1", &body).bytes()).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nAllow: GET\r\n"), "{text}");
}

#[test]
fn head_ends_at_the_blank_line() {
    assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(20));
    assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
    assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
}

fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serves_over_tcp_and_bounds_what_a_client_sends() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    serve_http(listener, Arc::new(body)).unwrap();
    let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nx 1\n"),
        "{ok}"
    );
    let missing = get(addr, b"GET /nothing HTTP/1.1\r\n\r\n");
    assert!(
        missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
        "{missing}"
    );
    // A head that never ends is cut at MAX_REQUEST bytes.
    let mut s = TcpStream::connect(addr).unwrap();
    let _ = s.write_all(&vec![b'a'; MAX_REQUEST + 2048]);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    // A silent client gets 408 once its time is up; others are served meanwhile.
    let mut silent = TcpStream::connect(addr).unwrap();
    let ok = get(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    let mut out = String::new();
    silent.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
}

#[test]
fn rates_over_windows() {
    let mut s = Sampler::<2>::default();
    assert_eq!(s.rate(Duration::from_secs(1)).seconds, 0.0);
    let t0 = Instant::now();
    // 40 samples at 250 ms: counter a grows 25 per sample (100/s), b stays.
    for i in 0..=60u64 {
        s.push(t0 + SAMPLE_PERIOD * i as u32, [25 * i, 5]);
    }
    let r = s.rate(Duration::from_secs(1));
    assert_eq!(r.seconds, 1.0);
    assert_eq!(r.per_s, [100.0, 0.0]);
    let w = s.windows(|r| r.seconds);
    assert_eq!((w.last_1s, w.last_10s), (1.0, 10.0));
    // Only what the longest window needs is kept.
    assert!(s.samples.len() <= 42, "{}", s.samples.len());
    // A counter that went back (a reopened group) is no negative rate.
    s.push(t0 + SAMPLE_PERIOD * 61, [0, 5]);
    assert_eq!(s.rate(Duration::from_secs(1)).per_s[0], 0.0);
}

#[test]
fn rates_just_after_start_use_what_there_is() {
    let mut s = Sampler::<1>::default();
    let t0 = Instant::now();
    s.push(t0, [0]);
    s.push(t0 + Duration::from_millis(500), [50]);
    let r = s.rate(Duration::from_secs(10));
    assert_eq!((r.seconds, r.per_s), (0.5, [100.0]));
    assert_eq!(window_label(10, r.seconds), "last 0.5 s");
    assert_eq!(window_label(10, 10.0), "last 10 s");
    assert_eq!(mib_per_s(3.0 * 1024.0 * 1024.0), "3.0 MiB/s");
}

#[test]
fn rates_read_back_from_json_as_the_same_numbers() {
    let mut s = Sampler::<1>::default();
    let t0 = Instant::now();
    s.push(t0, [0]);
    s.push(t0 + Duration::from_nanos(1_234_567_891), [77_777_777]);
    let r = s.rate(Duration::from_secs(1));
    for v in [r.seconds, r.per_s[0]] {
        let text = serde_json::to_string(&v).unwrap();
        let back: f64 = serde_json::from_str(&text).unwrap();
        assert_eq!(back.to_bits(), v.to_bits(), "{text}");
        assert!(text.split('.').nth(1).map_or(0, str::len) <= 3, "{text}");
    }
}
