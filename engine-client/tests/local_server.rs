//! The client against a real local TLS 1.3 server (hyper, certificates from rcgen): error
//! bodies, the body limit, timeouts, retry, trust, keep-alive and a roots swap.

use bytes::Bytes;
use capstan_engine_client::{Auth, Client, Error, Method, Options, Retry, Roots, StatusCode};
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>> + Send + Sync,
>;

/// A CA and a server certificate for 127.0.0.1 it issued.
struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.clone().self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let server =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
    Pki {
        ca_pem,
        server: Arc::new(server),
    }
}

struct Server {
    addr: SocketAddr,
    /// TCP connections accepted.
    accepted: Arc<AtomicUsize>,
}

/// Serves `handler` over TLS with `config`; the first `drop_first` connections are
/// closed as soon as they are accepted.
async fn serve(config: Arc<rustls::ServerConfig>, drop_first: usize, handler: Handler) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            if count.fetch_add(1, Ordering::SeqCst) < drop_first {
                drop(tcp);
                continue;
            }
            let (acceptor, handler) = (tokio_rustls::TlsAcceptor::from(config.clone()), handler.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |request| {
                    let handler = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(handler(request).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http1_only()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Server { addr, accepted }
}

fn answer(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

fn fixed(status: u16, body: &'static str) -> Handler {
    Arc::new(move |_| Box::pin(async move { answer(status, body) }))
}

fn client(server: &Server, roots_pem: &str, options: Options) -> Client {
    Client::new(
        &format!("https://{}", server.addr),
        Roots::pem(roots_pem).unwrap(),
        options,
    )
    .unwrap()
}

/// Up to `attempts` attempts, 10 ms apart, after connection failures and, if
/// `unavailable`, after a 503.
fn retrying(attempts: u32, unavailable: bool) -> Options {
    Options {
        retry: Retry {
            attempts,
            backoff: Duration::from_millis(10),
            unavailable,
        },
        ..Options::default()
    }
}

#[tokio::test]
async fn error_bodies_become_typed_errors_without_the_token() {
    let pki = pki();
    let server = serve(
        pki.server.clone(),
        0,
        fixed(
            403,
            r#"{"errors": ["permission denied", "token hvs.SECRET is not allowed"]}"#,
        ),
    )
    .await;
    let client = client(&server, &pki.ca_pem, Options::default());
    let error = client
        .call(Method::GET, "secret/data/app?version=2", Some("hvs.SECRET"), None)
        .await
        .unwrap_err();
    let api = error.api().expect("an API error");
    assert_eq!(api.status, StatusCode::FORBIDDEN);
    assert_eq!(api.path, "secret/data/app");
    assert_eq!(
        api.errors,
        ["permission denied", "token <redacted> is not allowed"]
    );
    assert!(!error.to_string().contains("hvs.SECRET"), "{error}");

    // A typed call redacts the lease id it sent too.
    let server = serve(
        pki.server.clone(),
        0,
        fixed(400, r#"{"errors": ["lease db/creds/app/L1234 not found"]}"#),
    )
    .await;
    let error = self::client(&server, &pki.ca_pem, Options::default())
        .renew_lease("hvs.SECRET", "db/creds/app/L1234", Duration::from_secs(60))
        .await
        .err()
        .unwrap();
    assert_eq!(
        error.to_string(),
        "the engine refused sys/leases/renew: 400 Bad Request: lease <redacted> not found"
    );
}

#[tokio::test]
async fn answers_over_the_limit_are_refused() {
    let pki = pki();
    let big: Handler = Arc::new(|_| Box::pin(async { answer(200, vec![b' '; 2048]) }));
    let server = serve(pki.server.clone(), 0, big).await;
    let options = Options {
        body_limit: 1024,
        ..Options::default()
    };
    let error = client(&server, &pki.ca_pem, options)
        .call(Method::GET, "sys/health", None, None)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::TooLarge { limit: 1024, .. }), "{error}");
    // Within the limit, the same answer is read.
    let answer = client(&server, &pki.ca_pem, Options::default())
        .send(Method::GET, "/v1/sys/health", Auth::None, None, &[])
        .await
        .unwrap();
    assert_eq!(answer.body.len(), 2048);
}

#[tokio::test]
async fn a_slow_answer_times_out() {
    let pki = pki();
    let slow: Handler = Arc::new(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            answer(200, "{}")
        })
    });
    let server = serve(pki.server.clone(), 0, slow).await;
    let options = Options {
        timeout: Duration::from_millis(200),
        ..Options::default()
    };
    let started = std::time::Instant::now();
    let error = client(&server, &pki.ca_pem, options)
        .call(Method::GET, "sys/health", None, None)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_dropped_connection_is_retried_only_when_the_policy_says_so() {
    let pki = pki();
    let server = serve(pki.server.clone(), 1, fixed(200, r#"{"ok": true}"#)).await;
    let error = client(&server, &pki.ca_pem, Options::default())
        .call(Method::POST, "sys/thing", None, None)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error}");

    let server = serve(pki.server.clone(), 2, fixed(200, r#"{"ok": true}"#)).await;
    let body = client(&server, &pki.ca_pem, retrying(3, false))
        .call(Method::POST, "sys/thing", None, None)
        .await
        .unwrap();
    assert_eq!(body["ok"], true);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn unavailable_is_retried_only_when_the_policy_says_so() {
    let pki = pki();
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    let sealed_twice: Handler = Arc::new(move |_| {
        let sealed = count.fetch_add(1, Ordering::SeqCst) < 2;
        Box::pin(async move {
            if sealed {
                answer(503, r#"{"errors": ["Vault is sealed"]}"#)
            } else {
                answer(200, "{}")
            }
        })
    });
    let server = serve(pki.server.clone(), 0, sealed_twice).await;
    let error = client(&server, &pki.ca_pem, retrying(3, false))
        .call(Method::GET, "sys/thing", None, None)
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    client(&server, &pki.ca_pem, retrying(3, true))
        .call(Method::GET, "sys/thing", None, None)
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_server_outside_the_roots_is_refused() {
    let (trusted, other) = (pki(), pki());
    let server = serve(other.server.clone(), 0, fixed(200, "{}")).await;
    let error = client(&server, &trusted.ca_pem, Options::default())
        .call(Method::GET, "sys/health", Some("hvs.SECRET"), None)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error}");
    assert!(error.to_string().contains("TLS"), "{error}");
    // Not even an empty bundle can be given.
    assert!(Roots::pem("no certificate here").is_err());
}

#[tokio::test]
async fn requests_share_one_kept_alive_connection_until_the_roots_change() {
    let pki = pki();
    let server = serve(pki.server.clone(), 0, fixed(200, r#"{"data": {}}"#)).await;
    let client = client(&server, &pki.ca_pem, Options::default());
    for _ in 0..2 {
        client.call(Method::GET, "sys/health", None, None).await.unwrap();
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);

    // The same bundle again changes nothing; another bundle (here: the CA and a
    // stranger) retires the kept connection.
    assert!(!client.roots().set_pem(&pki.ca_pem).unwrap());
    client.call(Method::GET, "sys/health", None, None).await.unwrap();
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    let both = format!("{}{}", pki.ca_pem, self::pki().ca_pem);
    assert!(client.roots().set_pem(&both).unwrap());
    client.call(Method::GET, "sys/health", None, None).await.unwrap();
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn roots_from_a_file_are_read_per_connection_and_none_until_set() {
    let pki = pki();
    let server = serve(pki.server.clone(), 0, fixed(200, "{}")).await;
    let dir = std::env::temp_dir().join(format!("capstan-engine-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("roots.pem");
    std::fs::write(&file, &pki.ca_pem).unwrap();
    let roots = Roots::file(&file).unwrap();
    let client = Client::new(&format!("https://{}", server.addr), roots, Options::default()).unwrap();
    client.call(Method::GET, "sys/health", None, None).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(Roots::file(&file).is_err());

    let later = Client::new(
        &format!("https://{}", server.addr),
        Roots::later(),
        Options::default(),
    )
    .unwrap();
    let error = later
        .call(Method::GET, "sys/health", None, None)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NoRoots), "{error}");
    later.roots().set_pem(&pki.ca_pem).unwrap();
    later.call(Method::GET, "sys/health", None, None).await.unwrap();
}

#[test]
fn only_https_urls() {
    assert!(Client::new("http://capstan-engine:8200", Roots::later(), Options::default()).is_err());
    let client = Client::new(
        "https://capstan-engine.capstan-system.svc:8200/",
        Roots::later(),
        Options::default(),
    )
    .unwrap();
    assert_eq!(client.url(), "https://capstan-engine.capstan-system.svc:8200");
}

#[tokio::test]
async fn typed_calls_authenticate_as_each_api_expects() {
    let pki = pki();
    let routes: Handler = Arc::new(|request| {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (bearer, token) = (header("authorization"), header("x-vault-token"));
        let path = request.uri().path().to_owned();
        Box::pin(async move {
            match (path.as_str(), bearer.as_deref(), token.as_deref()) {
                ("/v1/mesh/sign", Some("Bearer sa-token"), None) => answer(
                    200,
                    r#"{"certificate": "C", "roots": ["R"], "spiffe_id": "spiffe://x/ns/a/sa/b", "not_after": "T"}"#,
                ),
                ("/v1/mesh/roots", None, None) => answer(200, r#"{"roots": ["R1", "R2"]}"#),
                ("/v1/auth/token/renew-self", None, Some("hvs.token")) => {
                    answer(200, r#"{"auth": {"lease_duration": 60, "renewable": true}}"#)
                }
                _ => answer(403, r#"{"errors": ["permission denied"]}"#),
            }
        })
    });
    let server = serve(pki.server.clone(), 0, routes).await;
    let client = client(&server, &pki.ca_pem, Options::default());
    let signed = client.mesh_sign("sa-token", "CSR").await.unwrap();
    assert_eq!((signed.certificate.as_str(), signed.chain.len()), ("C", 0));
    assert_eq!(client.mesh_roots().await.unwrap().roots, ["R1", "R2"]);
    let renewed = client
        .renew_self("hvs.token", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(renewed.ttl, Duration::from_secs(60));
    let refused = client.mesh_sign("other", "CSR").await.err().unwrap();
    assert_eq!(refused.status(), Some(StatusCode::FORBIDDEN));
}
