//! The store on S3 against a real S3 server (SeaweedFS on 127.0.0.1): the client's conditional
//! writes and its errors, then replication uploading to the bucket and restore reading from it.

use bucket::{Bucket, Error, Location};
use tests::s3::{Seaweed, ACCESS_KEY};

fn client(s: &Seaweed, bucket: &str, secret: &str) -> Bucket {
    let mut settings = s.settings();
    settings.s3_secret_access_key = Some(secret.into());
    let loc = Location {
        bucket: bucket.into(),
        prefix: "p".into(),
    };
    Bucket::open(loc, &settings).expect("a client")
}

#[test]
fn conditional_writes_let_one_writer_win() {
    let s = Seaweed::start("cdp").expect("start SeaweedFS");
    let b = client(&s, "cdp", tests::s3::SECRET_KEY);
    b.check().expect("the bucket is there");
    assert!(b.put_if_absent("x", &b"one"[..]).expect("put"));
    assert!(!b.put_if_absent("x", &b"two"[..]).expect("put again"));
    assert_eq!(&b.get("x").expect("get").expect("there").0[..], b"one");
    assert_eq!(&b.get_range("x", 1..3).expect("range")[..], b"ne");

    let e1 = b.put_if_match("m", &b"gen 1"[..], None).expect("create");
    assert!(matches!(
        b.put_if_match("m", &b"gen 1b"[..], None),
        Err(Error::Changed { .. })
    ));
    let e2 = b
        .put_if_match("m", &b"gen 2"[..], Some(&e1))
        .expect("update");
    assert!(matches!(
        b.put_if_match("m", &b"gen 2b"[..], Some(&e1)),
        Err(Error::Changed { .. })
    ));
    let (bytes, etag) = b.get("m").expect("get").expect("there");
    assert_eq!((&bytes[..], etag), (&b"gen 2"[..], e2));
    let keys: Vec<String> = b.list("").expect("list").into_iter().map(|k| k.0).collect();
    assert_eq!(keys, ["m", "x"]);
    b.delete("x").expect("delete");
    b.delete("x").expect("delete again");
    assert!(b.get("x").expect("get").is_none());
}

#[test]
fn bad_credentials_a_missing_bucket_and_a_gone_server_are_explained() {
    let mut s = Seaweed::start("cdp").expect("start SeaweedFS");
    let e = client(&s, "cdp", "wrong-secret").check().unwrap_err();
    assert!(matches!(e, Error::Credentials { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(ACCESS_KEY) && text.contains("AWS_SECRET_ACCESS_KEY"),
        "{text}"
    );

    let e = client(&s, "no-such-bucket", tests::s3::SECRET_KEY)
        .check()
        .unwrap_err();
    assert!(matches!(e, Error::NoBucket { .. }), "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");

    s.kill();
    let e = client(&s, "cdp", tests::s3::SECRET_KEY)
        .check()
        .unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("AWS_ENDPOINT_URL"), "{e}");
}
