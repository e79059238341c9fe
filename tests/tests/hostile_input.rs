//! Hostile input against the payments example (issue 4): raw HTTP/1.1 bytes over real TCP, so
//! nothing between the test and the server sanitises them.
//!
//! [`hostile_requests`] is the table: each row is one crafted `POST /payments`, the answer it must
//! get, and proof of what did not happen (the user's `GET /payments` lists no payment the row did
//! not mean to create; a key the row used is still free for a correct retry, which runs and is not
//! replayed). The tests after it need timing or state a table row cannot express: an enormous
//! header block, a lying `Content-Length`, a trickled body, and key floods against a small
//! `MemoryStore`. docs/SECURITY.md lists every row with its guarantee.

use std::time::{Duration, Instant};

use idem_examples::payments::{self, Settings};
use idem_runtime::Idempotency;
use idem_runtime::fingerprint::{RecordKey, scope};
use idem_runtime::key::IdempotencyKey;
use idem_runtime::store::{MemoryStore, RedisConfig, RedisStore};
use idem_tests::redis::RedisServer;
use idem_tests::support::{
    IDEMPOTENCY_KEY, Reply, Server, http1_request, http1_request_bytes, keyed,
    parse_http1_response, raw_exchange, send, wait_idle, within,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A valid payment body.
const PAYMENT: &[u8] = br#"{"amount":100,"currency":"EUR"}"#;
/// The key every row's user pays with first: hostile keys that imitate it must not meet it.
const BASELINE_KEY: &str = "k1";

/// What a row must be answered with.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// idem's `400 idempotency-key-invalid` problem: the key was refused before anything ran.
    KeyInvalid,
    /// hyper refuses the request head itself with this status, before any routing (a plain
    /// response, not a problem document).
    HyperRejects(u16),
    /// axum or the example refuses the request with this status before the handler body runs.
    Rejected(u16),
    /// idem's `400 request-body-unreadable` problem: the body failed while idem buffered it.
    BodyUnreadable,
    /// An ordinary key: `201`, a new payment, not a replay of anything else.
    Created,
    /// Another spelling of the baseline key `k1`: its replay, nothing new runs.
    ReplaysBaseline,
}

struct Row {
    name: &'static str,
    /// Raw header lines after the fixed ones (`host`, `connection`, `content-length`).
    lines: Vec<Vec<u8>>,
    /// Send `Authorization: Bearer <row user>`.
    authenticated: bool,
    body: Vec<u8>,
    expect: Expect,
    /// A valid key the row used: afterwards a correct request with it must run (201, not
    /// replayed), proving the rejected request left no record behind.
    retry_key: Option<String>,
}

fn key_line(value: &[u8]) -> Vec<u8> {
    [b"idempotency-key: ".as_slice(), value].concat()
}

fn row(name: &'static str, key: &[u8], expect: Expect) -> Row {
    Row {
        name,
        lines: vec![key_line(key)],
        authenticated: true,
        body: PAYMENT.to_vec(),
        expect,
        retry_key: None,
    }
}

fn auth_line(user: &str) -> Vec<u8> {
    format!("authorization: Bearer {user}").into_bytes()
}

/// A correct `POST /payments` as `user` with `key`.
fn pay(user: &str, key: &str, body: &[u8]) -> Vec<u8> {
    let auth = format!("Bearer {user}");
    http1_request(
        "POST",
        "/payments",
        &[
            ("authorization", auth.as_str()),
            (IDEMPOTENCY_KEY, key),
            ("content-type", "application/json"),
        ],
        body,
    )
}

/// The ids of `user`'s payments, as `GET /payments` lists them.
async fn payment_ids(server: &Server, user: &str) -> Vec<String> {
    let auth = format!("Bearer {user}");
    let reply = raw_exchange(
        server.addr,
        &http1_request("GET", "/payments", &[("authorization", &auth)], b""),
    )
    .await;
    assert_eq!(reply.status, 200, "GET /payments: {reply:?}");
    reply
        .json()
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|payment| payment["id"].as_str().expect("an id").to_owned())
        .collect()
}

fn payment_id(reply: &Reply) -> String {
    reply.json()["id"].as_str().expect("an id").to_owned()
}

#[track_caller]
fn assert_created(reply: &Reply, what: &str) -> String {
    assert_eq!(reply.status, 201, "{what}: {reply:?}");
    assert!(!reply.replayed(), "{what}: a first execution, not a replay");
    payment_id(reply)
}

/// The table: header and body bounds, authentication, then [`character_rows`].
fn hostile_rows() -> Vec<Row> {
    let long = |n: usize| "k".repeat(n).into_bytes();
    let quoted = |inner: &[u8]| [b"\"".as_slice(), inner, b"\""].concat();
    let mut rows = vec![
        // Header bounds.
        row("key of 255 bytes", &long(255), Expect::Created),
        row("key of 256 bytes", &long(256), Expect::KeyInvalid),
        row(
            "quoted key of 255 bytes",
            &quoted(&"q".repeat(255).into_bytes()),
            Expect::Created,
        ),
        row(
            "quoted key of 256 bytes",
            &quoted(&long(256)),
            Expect::KeyInvalid,
        ),
        row("key of 64 KiB", &long(64 << 10), Expect::KeyInvalid),
        Row {
            lines: (0..120)
                .map(|i| format!("x-filler-{i}: {i}").into_bytes())
                .chain([key_line(b"many-headers")])
                .collect(),
            retry_key: Some("many-headers".into()),
            ..row("120 header lines", b"", Expect::HyperRejects(431))
        },
        // Body bounds: axum's default limit is 2 MiB.
        Row {
            body: vec![b' '; (2 << 20) + 1],
            retry_key: Some("big-body".into()),
            ..row("body of 2 MiB + 1", b"big-body", Expect::Rejected(413))
        },
        Row {
            body: b"{\"amount\":".to_vec(),
            retry_key: Some("bad-json".into()),
            ..row("truncated JSON body", b"bad-json", Expect::Rejected(400))
        },
        // Authentication runs first: a 401 is never recorded.
        Row {
            authenticated: false,
            retry_key: Some("no-auth".into()),
            ..row("no Authorization", b"no-auth", Expect::Rejected(401))
        },
    ];
    rows.extend(character_rows());
    // A key spelled like the Redis key name of the user's own baseline record.
    rows.push(row(
        "quoted idem:v1:{<record key of k1>}",
        b"",
        Expect::Created,
    ));
    rows
}

/// Rows about the characters and the shape of the `Idempotency-Key` field.
fn character_rows() -> Vec<Row> {
    vec![
        // Respelling a key does not get around its record.
        row("quoted \"k1\"", b"\"k1\"", Expect::ReplaysBaseline),
        row(
            "k1 padded with spaces",
            b"   k1   ",
            Expect::ReplaysBaseline,
        ),
        // Keys that look like Redis hash tags, key names, globs or protocol.
        row("bare {k1}", b"{k1}", Expect::KeyInvalid),
        row("quoted {k1}", b"\"{k1}\"", Expect::Created),
        row("quoted }{", b"\"}{\"", Expect::Created),
        row("glob *", b"*", Expect::Created),
        row("quoted k1*", b"\"k1*\"", Expect::Created),
        row("bare idem:v1:{…}", b"idem:v1:{k1}", Expect::KeyInvalid),
        row(
            "escaped CR LF in an sf-string",
            br#""k1\r\n*1\r\n$8\r\nFLUSHALL""#,
            Expect::KeyInvalid,
        ),
        row("bare CR", b"k1\rX", Expect::HyperRejects(400)),
        row("bare LF", b"k1\nX", Expect::HyperRejects(400)),
        Row {
            lines: vec![key_line(b"k1"), b" folded".to_vec()],
            ..row("obs-fold continuation", b"", Expect::HyperRejects(400))
        },
        // Unicode and control bytes.
        row("UTF-8 é", "caf\u{e9}".as_bytes(), Expect::KeyInvalid),
        row(
            "UTF-8 emoji, quoted",
            "\"\u{1f4b8}\"".as_bytes(),
            Expect::KeyInvalid,
        ),
        row("NUL", b"k1\0x", Expect::HyperRejects(400)),
        row("DEL", b"k1\x7fx", Expect::HyperRejects(400)),
        row("inner tab", b"k1\tx", Expect::KeyInvalid),
        row("vertical tab", b"k1\x0bx", Expect::HyperRejects(400)),
        row("obs-text 0x80", b"k1\x80", Expect::KeyInvalid),
        row("obs-text 0xFF, quoted", b"\"\xff\"", Expect::KeyInvalid),
        // Field shapes.
        Row {
            lines: vec![key_line(b"dup"), key_line(b"dup")],
            ..row("two Idempotency-Key lines", b"", Expect::KeyInvalid)
        },
        Row {
            lines: vec![
                b"Idempotency-Key: dup".to_vec(),
                b"IDEMPOTENCY-KEY: dup".to_vec(),
            ],
            ..row("two lines in different case", b"", Expect::KeyInvalid)
        },
        Row {
            lines: vec![b"idempotency-key : k1".to_vec()],
            ..row("space before the colon", b"", Expect::HyperRejects(400))
        },
        // Request smuggling: both framings at once.
        Row {
            lines: vec![key_line(b"smuggle"), b"transfer-encoding: chunked".to_vec()],
            retry_key: Some("smuggle".into()),
            // hyper reads the body as chunked (ignoring Content-Length, as RFC 9112 asks); the
            // bytes are not valid chunked encoding, so the body fails while idem buffers it.
            ..row("Content-Length and chunked", b"", Expect::BodyUnreadable)
        },
        row("list a, b", b"a, b", Expect::KeyInvalid),
        row("quoted list", b"\"a\", \"b\"", Expect::KeyInvalid),
        row("empty value", b"", Expect::KeyInvalid),
        row("only spaces", b"   ", Expect::KeyInvalid),
        row("empty sf-string", b"\"\"", Expect::KeyInvalid),
        row("unterminated sf-string", b"\"k1", Expect::KeyInvalid),
    ]
}

/// The key that spells the Redis key name (`idem:v1:{<hex>}`) of `user`'s baseline record.
fn imitation_of_baseline(user: &str) -> Vec<u8> {
    let key = IdempotencyKey::parse_bytes(BASELINE_KEY.as_bytes()).unwrap();
    let name = format!(
        "idem:v1:{{{}}}",
        RecordKey::new(&scope(user), &key).to_hex()
    );
    format!("\"{name}\"").into_bytes()
}

#[tokio::test]
async fn hostile_requests() {
    let idem = Idempotency::builder().build();
    let server = Server::start(payments::app(&idem, Settings::default())).await;

    for (index, mut row) in hostile_rows().into_iter().enumerate() {
        let user = format!("hostile-{index}");
        let what = format!("row {index} ({})", row.name);
        if row.name.starts_with("quoted idem:v1:") {
            row.lines = vec![key_line(&imitation_of_baseline(&user))];
        }

        let baseline = raw_exchange(server.addr, &pay(&user, BASELINE_KEY, PAYMENT)).await;
        let baseline_id = assert_created(&baseline, &format!("{what}: baseline"));

        let mut lines: Vec<&[u8]> = vec![b"content-type: application/json"];
        let auth = auth_line(&user);
        if row.authenticated {
            lines.push(&auth);
        }
        lines.extend(row.lines.iter().map(Vec::as_slice));
        let raw = http1_request_bytes("POST", "/payments", &lines, &row.body);
        // Written while the answer is read: the server may refuse before reading it all.
        let reply = exchange_while_writing(server.addr, &raw)
            .await
            .unwrap_or_else(|| panic!("{what}: no answer"));

        let mut expected_ids = vec![baseline_id.clone()];
        match row.expect {
            Expect::KeyInvalid => {
                assert_eq!(reply.status, 400, "{what}: {reply:?}");
                reply.assert_problem(400, "idempotency-key-invalid");
            }
            Expect::BodyUnreadable => {
                reply.assert_problem(400, "request-body-unreadable");
            }
            Expect::HyperRejects(status) => {
                assert_eq!(reply.status, status, "{what}: {reply:?}");
                assert_ne!(
                    reply.header("content-type"),
                    Some("application/problem+json"),
                    "{what}: refused by hyper before any handler"
                );
            }
            Expect::Rejected(status) => {
                assert_eq!(reply.status, status, "{what}: {reply:?}");
                assert!(!reply.replayed(), "{what}");
            }
            Expect::Created => {
                let id = assert_created(&reply, &what);
                assert_ne!(id, baseline_id, "{what}: must not meet the key it imitates");
                expected_ids.push(id.clone());
                // The hostile key is an ordinary key: the same request again is its replay …
                let again = raw_exchange(server.addr, &raw).await;
                assert!(
                    again.replayed(),
                    "{what}: the repeat is a replay: {again:?}"
                );
                assert_eq!(again.body, reply.body, "{what}");
                // … and it stays private to its user.
                let other = auth_line(&format!("{user}-other"));
                let mut foreign_lines = lines.clone();
                foreign_lines[1] = &other;
                let foreign = raw_exchange(
                    server.addr,
                    &http1_request_bytes("POST", "/payments", &foreign_lines, &row.body),
                )
                .await;
                assert_created(&foreign, &format!("{what}: the same key as another user"));
            }
            Expect::ReplaysBaseline => {
                assert!(reply.replayed(), "{what}: {reply:?}");
                assert_eq!(payment_id(&reply), baseline_id, "{what}");
            }
        }
        // The baseline record is untouched: its own retry is still its replay.
        let baseline_again = raw_exchange(server.addr, &pay(&user, BASELINE_KEY, PAYMENT)).await;
        assert!(baseline_again.replayed(), "{what}: baseline replay");
        assert_eq!(payment_id(&baseline_again), baseline_id, "{what}");

        assert_eq!(
            payment_ids(&server, &user).await,
            expected_ids,
            "{what}: the payments the user has"
        );
        if let Some(key) = &row.retry_key {
            let retry = raw_exchange(server.addr, &pay(&user, key, PAYMENT)).await;
            assert_created(
                &retry,
                &format!("{what}: a correct retry with the same key"),
            );
        }
    }
    wait_idle(&idem).await;
    server.stop().await;
}

/// A header block far past hyper's buffer (about 400 KiB) is refused with `431` or a closed
/// connection; the server neither panics nor stops serving.
#[tokio::test]
async fn enormous_header_block_is_refused_and_the_server_keeps_serving() {
    let idem = Idempotency::builder().build();
    let server = Server::start(payments::app(&idem, Settings::default())).await;

    let filler = format!("x-filler: {}", "a".repeat(4 << 20));
    let raw = http1_request_bytes(
        "POST",
        "/payments",
        &[
            b"authorization: Bearer giant",
            b"idempotency-key: giant",
            filler.as_bytes(),
        ],
        PAYMENT,
    );
    if let Some(reply) = exchange_while_writing(server.addr, &raw).await {
        assert_eq!(reply.status, 431, "{reply:?}");
    }

    let reply = raw_exchange(server.addr, &pay("giant", "giant", PAYMENT)).await;
    assert_created(&reply, "the next connection, with the same key");
    server.stop().await;
}

/// A chunked body past the 2 MiB limit (no `Content-Length` to judge it by) is a `413` and leaves
/// the key free.
#[tokio::test]
async fn chunked_body_over_the_limit_is_refused() {
    let idem = Idempotency::builder().build();
    let server = Server::start(payments::app(&idem, Settings::default())).await;

    let mut raw = b"POST /payments HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\
                    authorization: Bearer chunky\r\nidempotency-key: chunky\r\n\
                    content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..33 {
        raw.extend_from_slice(b"10000\r\n");
        raw.extend(std::iter::repeat_n(b' ', 0x10000));
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let reply = exchange_while_writing(server.addr, &raw)
        .await
        .expect("the 413 arrives");
    assert_eq!(reply.status, 413, "{reply:?}");

    let retry = raw_exchange(server.addr, &pay("chunky", "chunky", PAYMENT)).await;
    assert_created(&retry, "a correct retry with the same key");
    assert_eq!(payment_ids(&server, "chunky").await, [payment_id(&retry)]);
    server.stop().await;
}

/// A lying `Content-Length`, with a 31-byte body. Over the body limit (1 GB declared) the answer is
/// `413` at once: idem compares the declared length with axum's limit before reading anything.
/// Under the limit (1 000 declared) the server waits for bytes that never come (axum's limit
/// counts the bytes that arrive and `axum::serve` sets no body timeout); idem reads the whole body
/// before it acquires the key, so that waiting connection holds nothing and a correct request
/// with the same key runs at once. Closing the lying connection never records anything either.
#[tokio::test]
async fn lying_content_length_never_takes_the_key() {
    let idem = Idempotency::builder().build();
    let server = Server::start(payments::app(&idem, Settings::default())).await;
    let liar = |key: &str, length: u64| {
        let head = format!(
            "POST /payments HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer liar\r\n\
             idempotency-key: {key}\r\ncontent-type: application/json\r\n\
             content-length: {length}\r\n\r\n"
        );
        [head.as_bytes(), PAYMENT].concat()
    };

    // Over the limit: refused before a byte of the body is read.
    let started = Instant::now();
    let refused = raw_exchange(server.addr, &liar("huge", 1_000_000_000)).await;
    assert_eq!(refused.status, 413, "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once"
    );
    let retry = raw_exchange(server.addr, &pay("liar", "huge", PAYMENT)).await;
    assert_created(&retry, "a correct retry with the refused key");

    // Under the limit: the server waits for the rest, holding no lease meanwhile.
    let mut lying = TcpStream::connect(server.addr).await.unwrap();
    lying.write_all(&liar("short", 1000)).await.unwrap();
    let mut early = [0_u8; 1024];
    let answered = tokio::time::timeout(Duration::from_millis(300), lying.read(&mut early)).await;
    assert!(
        answered.is_err(),
        "the server waits for the declared body: {:?}",
        answered.map(|n| String::from_utf8_lossy(&early[..n.unwrap_or(0)]).into_owned())
    );
    let started = Instant::now();
    let honest = raw_exchange(server.addr, &pay("liar", "short", PAYMENT)).await;
    assert_created(&honest, "the same key while the liar's body is pending");
    assert!(started.elapsed() < Duration::from_secs(2), "it ran at once");

    drop(lying);
    let again = raw_exchange(server.addr, &pay("liar", "short", PAYMENT)).await;
    assert!(again.replayed(), "the honest request's record stands");
    assert_eq!(
        payment_ids(&server, "liar").await,
        [payment_id(&retry), payment_id(&honest)]
    );
    server.stop().await;
}

/// A trickled body. The lease is taken only after the body is read, so while one request's body
/// trickles in, a request with the same key and a full body from another connection runs at
/// once. When the slow request finally completes its body, the key is already recorded: with the
/// same body it gets the winner's replay (same payment, `Idempotent-Replayed: true`); with a
/// different body it gets `422 idempotency-key-reused`. Neither runs the handler: the user ends
/// with exactly the two payments of the fast requests.
#[tokio::test]
async fn trickled_body_does_not_hold_the_key() {
    let idem = Idempotency::builder().build();
    let server = Server::start(payments::app(&idem, Settings::default())).await;
    let user = "trickler";
    let other_body: &[u8] = br#"{"amount":200,"currency":"EUR"}"#;

    let slow = [("slow-same", PAYMENT), ("slow-other", other_body)];
    let mut streams = Vec::new();
    for (key, body) in slow {
        let raw = pay(user, key, body);
        let split = raw.len() - body.len() + 3; // the head and 3 bytes of body
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(&raw[..split]).await.unwrap();
        streams.push((stream, raw[split..].to_vec()));
    }
    // Let the server read both heads and start waiting for the bodies.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut winners = Vec::new();
    for (key, _) in slow {
        let started = Instant::now();
        let fast = raw_exchange(server.addr, &pay(user, key, PAYMENT)).await;
        winners.push(assert_created(
            &fast,
            &format!("{key}: the full body first"),
        ));
        assert!(started.elapsed() < Duration::from_secs(2), "ran at once");
    }

    let mut answers = Vec::new();
    for (mut stream, rest) in streams {
        for byte in rest {
            stream.write_all(&[byte]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut received = Vec::new();
        within("the slow answer", stream.read_to_end(&mut received))
            .await
            .unwrap();
        answers.push(parse_http1_response(&received));
    }
    assert_eq!(answers[0].status, 201, "{:?}", answers[0]);
    assert!(answers[0].replayed(), "same body: the winner's replay");
    assert_eq!(payment_id(&answers[0]), winners[0]);
    answers[1].assert_problem(422, "idempotency-key-reused");

    assert_eq!(payment_ids(&server, user).await, winners);
    server.stop().await;
}

/// 20 000 distinct keys from one user against a 256 KiB `MemoryStore`: the store stays within
/// its bound all along (records are evicted, memory is not exhausted).
#[tokio::test]
async fn key_flood_keeps_the_memory_store_bounded() {
    const BOUND: u64 = 256 << 10;
    let store = MemoryStore::new(BOUND);
    let idem = Idempotency::builder().store(store.clone()).build();
    let app = payments::app(&idem, Settings::default());

    for i in 0..20_000 {
        let reply = send(&app, flood_request("flooder", &format!("flood-{i}"))).await;
        assert_eq!(reply.status, 201, "key {i}: {reply:?}");
        if i % 1000 == 999 {
            let size = store.weighted_size();
            assert!(
                size <= BOUND,
                "after {} keys: {size} bytes > {BOUND}",
                i + 1
            );
        }
    }
    wait_idle(&idem).await;
    let size = store.weighted_size();
    assert!(size <= BOUND, "{size} bytes > {BOUND}");
    assert!(
        !store.is_empty() && store.len() < 20_000,
        "{} records",
        store.len()
    );
}

/// A key flood must not make a running request's key look free: while a slow payment holds its
/// lease, 5 000 other keys from the same user fill a 256 KiB `MemoryStore`, and a duplicate of
/// the slow payment must still get `409 request-in-progress`. (If the store dropped the in-flight
/// record to make room, or never admitted it, the duplicate would run beside the first: a double
/// charge.)
#[tokio::test]
async fn key_flood_does_not_free_an_in_flight_key() {
    let store = MemoryStore::new(256 << 10);
    let idem = Idempotency::builder().store(store.clone()).build();
    let fast = payments::app(&idem, Settings::default());
    let slow = payments::app(
        &idem,
        Settings {
            processing: Duration::from_secs(20),
            ..Settings::default()
        },
    );

    // Fill the store first, so the slow request's record is written into a full store.
    for i in 0..5_000 {
        send(&fast, flood_request("victim", &format!("before-{i}"))).await;
    }
    let held = tokio::spawn({
        let slow = slow.clone();
        async move { send(&slow, flood_request("victim", "the-payment")).await }
    });
    within("the slow payment to start", async {
        while idem.running() == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    for i in 0..5_000 {
        send(&fast, flood_request("victim", &format!("after-{i}"))).await;
    }

    let duplicate = send(&fast, flood_request("victim", "the-payment")).await;
    duplicate.assert_problem(409, "request-in-progress");
    held.abort();
}

/// A key flood on a full store drops the oldest records, never the newest: after 5 000 payments
/// through a 256 KiB `MemoryStore` (room for about 200), a retry of each of the last 50 is replayed
/// with its first answer. (moka's default `TinyLFU` admission refuses a record whose key it has never
/// seen, so most of these retries would charge again.)
#[tokio::test]
async fn key_flood_keeps_the_newest_records() {
    let idem = Idempotency::builder()
        .store(MemoryStore::new(256 << 10))
        .build();
    let app = payments::app(&idem, Settings::default());
    let mut answers = Vec::new();
    for i in 0..5_000 {
        let first = send(&app, flood_request("flooder", &format!("k-{i}"))).await;
        assert_eq!(first.status, 201, "{first:?}");
        if i >= 4_950 {
            answers.push((i, first.json()));
        }
    }
    for (i, first) in answers {
        let retry = send(&app, flood_request("flooder", &format!("k-{i}"))).await;
        assert!(
            retry.replayed(),
            "the retry of key {i} ran again: {retry:?}"
        );
        assert_eq!(retry.json(), first, "key {i}");
    }
}

/// Writes `raw` while reading the answer, for requests the server refuses before reading them
/// to the end. `None` when the connection was reset before any answer could be read: the kernel
/// may drop a response when the server closes with unread bytes (a RST).
async fn exchange_while_writing(addr: std::net::SocketAddr, raw: &[u8]) -> Option<Reply> {
    let mut stream = within("connecting", TcpStream::connect(addr))
        .await
        .unwrap();
    let (mut read, mut write) = stream.split();
    let writing = async {
        let _ = write.write_all(raw).await;
    };
    let mut received = Vec::new();
    let reading = async {
        let _ = read.read_to_end(&mut received).await;
    };
    within("the refusal", async { tokio::join!(writing, reading) }).await;
    (!received.is_empty()).then(|| parse_http1_response(&received))
}

/// A malformed key is refused on a route where the key is optional too (`PATCH`, no `required`):
/// it is never taken as "no key" and run unprotected.
#[tokio::test]
async fn malformed_key_on_an_optional_route_is_refused() {
    let idem = Idempotency::builder().build();
    let server = Server::start(payments::app(&idem, Settings::default())).await;
    let created = raw_exchange(server.addr, &pay("patcher", "p1", PAYMENT)).await;
    let id = assert_created(&created, "the payment to patch");

    let path = format!("/payments/{id}");
    let update = br#"{"description":"hostile"}"#;
    for key in [b"a, b".as_slice(), b"caf\xc3\xa9", b"", b"\"\""] {
        let raw = http1_request_bytes(
            "PATCH",
            &path,
            &[
                b"authorization: Bearer patcher",
                b"content-type: application/json",
                &key_line(key),
            ],
            update,
        );
        let reply = raw_exchange(server.addr, &raw).await;
        reply.assert_problem(400, "idempotency-key-invalid");
    }
    let auth = [("authorization", "Bearer patcher")];
    let shown = raw_exchange(server.addr, &http1_request("GET", &path, &auth, b"")).await;
    assert_eq!(shown.json().get("description"), None, "nothing was patched");
    server.stop().await;
}

fn flood_request(user: &str, key: &str) -> http::Request<axum::body::Body> {
    let mut request = keyed("POST", "/payments", key, PAYMENT);
    let headers = request.headers_mut();
    headers.insert("authorization", format!("Bearer {user}").parse().unwrap());
    headers.insert("content-type", "application/json".parse().unwrap());
    request
}

/// Client bytes never reach a Redis key name: keys that imitate hash tags, key names, globs and
/// delimiters, sent to the payments example on a real Redis, leave one record each, all with
/// names of the same length that contain none of the client's characters.
#[tokio::test]
async fn client_keys_never_reach_redis_key_names() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(redis.url(), RedisConfig::new())
        .await
        .unwrap();
    let idem = Idempotency::builder().store(store).build();
    let server = Server::start(payments::app(&idem, Settings::default())).await;

    let keys = [
        "\"{k1}\"",
        "\"}{\"",
        "\"idem:v1:{k1}\"",
        "*",
        "\"k1*\"",
        "\"k1 \\\"quoted\\\"\"",
        "sneaky-key",
    ];
    for key in keys {
        let reply = raw_exchange(server.addr, &pay("redis-user", key, PAYMENT)).await;
        assert_created(&reply, key);
    }
    wait_idle(&idem).await;

    let names: Vec<String> = redis.query(redis::cmd("KEYS").arg("*"));
    assert_eq!(names.len(), keys.len(), "one record per key: {names:?}");
    assert!(
        names.iter().all(|name| name.len() == names[0].len()),
        "fixed-length names: {names:?}"
    );
    for key in keys {
        let key = IdempotencyKey::parse_bytes(key.as_bytes()).unwrap();
        for name in &names {
            assert!(
                !name.contains(key.as_str()) && !name.contains("k1") && !name.contains("sneaky"),
                "{name:?} carries client bytes"
            );
        }
    }
    server.stop().await;
}
