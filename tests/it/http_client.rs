//! The connector HTTP client against servers that write raw bytes: body limits
//! (declared and streamed), connection reuse and a server closing idle
//! connections, refused connections, a response cut short, and TLS (certificate
//! verification on, ALPN offering exactly what `http2` allows).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paysync::connectors::http::{Http2, HttpExecutor, TransportError};
use paysync::connectors::{HttpRequest, Method};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn executor(max_response_bytes: usize, http2: Http2) -> HttpExecutor {
    HttpExecutor::new(
        Duration::from_secs(2),
        Duration::from_secs(5),
        max_response_bytes,
        http2,
    )
    .unwrap()
}

fn get(url: String) -> HttpRequest {
    HttpRequest {
        method: Method::Get,
        url: url.parse().unwrap(),
        headers: vec![("accept", "application/json".into())],
        body: None,
    }
}

/// Reads one request head (up to the blank line).
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A server that answers every request on a connection with `answer`, counting
/// connections; `close_after` closes each connection after that many answers.
async fn raw_server(
    answer: &'static [u8],
    close_after: Option<usize>,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut answered = 0;
                while read_head(&mut stream).await.is_some() {
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    answered += 1;
                    if close_after == Some(answered) {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), connections)
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: r-1\r\nx-other: dropped\r\ncontent-length: 2\r\n\r\n{}";

#[tokio::test]
async fn answers_keep_the_read_headers_and_reuse_one_connection() {
    let (base, connections) = raw_server(OK, None).await;
    let http = executor(1024, Http2::Auto);
    for _ in 0..20 {
        let r = http.send(&get(format!("{base}/x")), None).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{}");
        assert_eq!(r.header("x-request-id"), Some("r-1"));
        assert_eq!(r.header("x-other"), None, "only the read headers are kept");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );
}

#[tokio::test]
async fn a_server_closing_idle_connections_costs_no_failed_call() {
    // The server closes each connection after one answer (keep-alive ends on its
    // side): the next call must find the pooled connection closed and open another,
    // not fail.
    let (base, connections) = raw_server(OK, Some(1)).await;
    let http = executor(1024, Http2::Auto);
    for i in 0..10 {
        let r = http.send(&get(format!("{base}/x")), None).await;
        assert!(r.is_ok(), "call {i}: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(connections.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_declared_or_streamed() {
    const DECLARED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n";
    let (base, _) = raw_server(DECLARED, Some(1)).await;
    let r = executor(1024, Http2::Auto)
        .send(&get(format!("{base}/x")), None)
        .await;
    assert_eq!(r.unwrap_err(), TransportError::TooLarge(1024));

    // Chunked, no length: counted as it arrives.
    const STREAMED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n400\r\n\
        aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\
        aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\
        aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\
        aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\
        aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\
        aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\
        aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\
        aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\
        \r\n400\r\n";
    let (base, _) = raw_server(STREAMED, Some(1)).await;
    let r = executor(1000, Http2::Auto)
        .send(&get(format!("{base}/x")), None)
        .await;
    assert_eq!(r.unwrap_err(), TransportError::TooLarge(1000));
}

/// Audit: a 502 whose body exceeded `max_response_bytes` became a transport
/// error that the gateway reported as an unparseable success, so a proxy's large
/// error page never counted towards the circuit breaker. An error answer is its
/// status code; the body that does not fit is dropped.
#[tokio::test]
async fn an_error_answer_over_the_limit_keeps_its_status_and_drops_the_body() {
    const DECLARED: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 5000\r\n\r\n";
    let (base, _) = raw_server(DECLARED, Some(1)).await;
    let r = executor(1024, Http2::Auto)
        .send(&get(format!("{base}/x")), None)
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert!(r.body.is_empty());
    let mut streamed =
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..3 {
        streamed.extend_from_slice(b"200\r\n");
        streamed.extend_from_slice(&[b'x'; 512]);
        streamed.extend_from_slice(b"\r\n");
    }
    streamed.extend_from_slice(b"0\r\n\r\n");
    let streamed: &'static [u8] = Box::leak(streamed.into_boxed_slice());
    let (base, _) = raw_server(streamed, Some(1)).await;
    let r = executor(1000, Http2::Auto)
        .send(&get(format!("{base}/x")), None)
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("7"), "headers are kept");
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn a_refused_or_cut_connection_is_a_transport_error() {
    // Nothing listens on a port just freed.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = executor(1024, Http2::Auto)
        .send(&get(format!("http://127.0.0.1:{port}/x")), None)
        .await
        .unwrap_err();
    assert_eq!(e.label(), "transport", "{e:?}");
    assert!(e.to_string().contains("onnect"), "{e}");

    // The answer stops half way through its declared body.
    const CUT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"half";
    let (base, _) = raw_server(CUT, Some(1)).await;
    let e = executor(1024, Http2::Auto)
        .send(&get(format!("{base}/x")), None)
        .await
        .unwrap_err();
    assert_eq!(e.label(), "transport", "{e:?}");
}

#[tokio::test]
async fn the_request_carries_the_user_agent_and_the_credentials_only_in_their_header() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let head = read_head(&mut stream).await.unwrap();
        *kept.lock().unwrap() = head;
        stream.write_all(OK).await.unwrap();
    });
    let auth = paysync::connectors::auth::Authorization(secrecy::SecretString::from(
        "Bearer s3cret".to_owned(),
    ));
    let r = executor(1024, Http2::Auto)
        .send(&get(format!("http://{addr}/v1/tx?a=1")), Some(&auth))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let head = seen.lock().unwrap().to_lowercase();
    assert!(head.starts_with("get /v1/tx?a=1 http/1.1\r\n"), "{head}");
    assert!(head.contains(&format!("host: {addr}\r\n")), "{head}");
    assert!(head.contains("user-agent: paysync/"), "{head}");
    assert!(head.contains("accept: application/json\r\n"), "{head}");
    assert!(head.contains("authorization: bearer s3cret\r\n"), "{head}");
}

/// A TLS server with a self-signed certificate (tests/fixtures/tls) that records
/// the ALPN protocols each client offers.
async fn tls_server() -> (String, Arc<Mutex<Vec<Vec<String>>>>) {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");
    let certs = vec![CertificateDer::from_pem_file(format!("{dir}/cert.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/key.pem")).unwrap();
    let config = Arc::new(
        tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let offers = Arc::new(Mutex::new(Vec::new()));
    let seen = offers.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                tokio_rustls::rustls::server::Acceptor::default(),
                stream,
            );
            let Ok(start) = acceptor.await else { continue };
            let alpn = start
                .client_hello()
                .alpn()
                .map(|protocols| {
                    protocols
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .collect()
                })
                .unwrap_or_default();
            seen.lock().unwrap().push(alpn);
            // The client refuses the certificate: the handshake fails.
            let _ = start.into_stream(config.clone()).await;
        }
    });
    (format!("https://localhost:{}", addr.port()), offers)
}

#[tokio::test]
async fn tls_verifies_the_certificate_and_alpn_offers_what_http2_allows() {
    let (base, offers) = tls_server().await;
    for (mode, expected) in [
        (Http2::Auto, vec!["h2", "http/1.1"]),
        // No ALPN at all: the server answers HTTP/1.1.
        (Http2::Never, vec![]),
        (Http2::PriorKnowledge, vec!["h2"]),
    ] {
        let e = executor(1024, mode)
            .send(&get(format!("{base}/x")), None)
            .await
            .unwrap_err();
        // A self-signed certificate is not trusted: verification is on.
        assert_eq!(e.label(), "transport", "{mode:?}: {e:?}");
        assert!(e.to_string().contains("certificate"), "{mode:?}: {e}");
        let offered = offers.lock().unwrap().pop().expect("a client hello");
        assert_eq!(offered, expected, "{mode:?}");
    }
}
