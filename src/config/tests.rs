//! Loading and validation: defaults, overrides, secrets, and errors that name the key.

use super::*;
use crate::connectors::auth::digest;
use secrecy::SecretString;

/// The client id of a configured account (secrets show only masked).
fn client_id(s: &Settings, connector: &str, account: &str) -> String {
    let masked = s.connectors[connector].gateway.accounts[account]
        .credential
        .masked();
    assert_eq!(masked["client_secret"], "********");
    masked["client_id"].as_str().unwrap().to_owned()
}

/// True when the account's OAuth2 credentials are `id` and `secret` (through
/// the credential's limit key, a digest of both).
fn has_client_credentials(s: &Settings, connector: &str, account: &str, secret: &str) -> bool {
    let id = client_id(s, connector, account);
    s.connectors[connector].gateway.accounts[account]
        .credential
        .limit_key()
        == digest(&SecretString::from(format!("{id}\n{secret}")))
}

const MINIMAL: &str = r#"
[connectors.cm.accounts.default]
client_id = "shop"
client_secret = "s3cr3t-inline"
"#;

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("paysync.toml");
    std::fs::write(&path, toml).unwrap();
    Settings::load(&Sources {
        file: Some(path),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
}

#[test]
fn defaults_apply() {
    let s = load(MINIMAL, &[]).unwrap();
    assert_eq!(s.kafka.input_topic, "payment-status-requests");
    assert_eq!(s.kafka.output_topic, "payment-status-events");
    assert_eq!(s.kafka.dead_letter_topic, "payment-status-requests.dlq");
    assert_eq!(s.processing.max_in_flight, 256);
    assert_eq!(s.http.listen.port(), 9464);
    let cm = &s.connectors["cm"].gateway;
    assert_eq!(cm.base_url.as_str(), "https://api.pay.cm.com/");
    assert_eq!(cm.request_timeout, Duration::from_secs(10));
    assert_eq!(client_id(&s, "cm", "default"), "shop");
    assert_eq!(s.processing.stuck_after, Duration::from_secs(300));
    assert_eq!(s.kafka.max_record_bytes, 1_000_000);
    assert!(s.schema_registry.is_none());
}

#[test]
fn env_overrides_win_and_nest() {
    let s = load(
        MINIMAL,
        &[
            ("PAYSYNC_KAFKA__BROKERS", "b1:9092,b2:9092"),
            ("PAYSYNC_KAFKA__GROUP_ID", "123"),
            ("PAYSYNC_PROCESSING__MAX_IN_FLIGHT", "1000"),
            ("PAYSYNC_CONNECTORS__CM__REQUEST_TIMEOUT", "250ms"),
            ("PAYSYNC_CONNECTORS__CM__ACCOUNTS__SHOP2__CLIENT_ID", "id2"),
            (
                "PAYSYNC_CONNECTORS__CM__ACCOUNTS__SHOP2__CLIENT_SECRET",
                "sec2",
            ),
            ("PAYSYNC_KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
            ("PAYSYNC_CONFIG", "/ignored"),
            ("OTHER__VAR", "x"),
        ],
    )
    .unwrap();
    assert_eq!(s.kafka.brokers, "b1:9092,b2:9092");
    assert_eq!(s.kafka.group_id, "123");
    assert_eq!(s.processing.max_in_flight, 1000);
    assert_eq!(
        s.connectors["cm"].gateway.request_timeout,
        Duration::from_millis(250)
    );
    assert!(has_client_credentials(&s, "cm", "shop2", "sec2"));
    assert_eq!(s.kafka.consumer.0["session.timeout.ms"], "6000");
}

#[test]
fn secrets_from_env_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "from-file\n").unwrap();
    // The variable is set for this process only; its name is unique to this test.
    std::env::set_var("PAYSYNC_TEST_SECRET_FROM_ENV", "from-env");
    let toml = format!(
        r#"
[connectors.cm.accounts.a]
client_id = "a"
client_secret = {{ env = "PAYSYNC_TEST_SECRET_FROM_ENV" }}
[connectors.cm.accounts.b]
client_id = "b"
client_secret = {{ file = "{}" }}
"#,
        secret_file.display()
    );
    let s = Settings::from_toml(&toml).unwrap();
    assert!(has_client_credentials(&s, "cm", "a", "from-env"));
    assert!(has_client_credentials(&s, "cm", "b", "from-file"));
    assert!(!has_client_credentials(&s, "cm", "b", "from-env"));
    let missing = Settings::from_toml(
        "[connectors.cm.accounts.a]\nclient_id = \"a\"\nclient_secret = { env = \"PAYSYNC_TEST_SURELY_UNSET_VAR\" }\n",
    )
    .unwrap_err();
    assert_eq!(missing.key, "connectors.cm.accounts.a.client_secret");
}

#[test]
fn errors_name_the_key() {
    let cases: &[(&str, &str)] = &[
        (
            "[connectors.stripe.accounts.s]\napi_key = \"pk_live_publishable\"\n",
            "connectors.stripe.accounts.s.api_key",
        ),
        (
            "[connectors.stripe.accounts.s]\napi_key = \"sk_test_1\"\nstripe_account = \"acct_../x\"\n",
            "connectors.stripe.accounts.s.stripe_account",
        ),
        (
            "[connectors.stripe.accounts.s]\napi_key = \"sk_test_1\"\nclient_id = \"x\"\n",
            "connectors.stripe.accounts.s.client_id",
        ),
        (
            "[connectors.mollie]\napi_version = \"2024-01-01\"\n[connectors.mollie.accounts.m]\napi_key = \"test_x\"\n",
            "connectors.mollie.api_version",
        ),
        (
            "[connectors.stripe]\napi_version = \"2022 11 15\"\n[connectors.stripe.accounts.s]\napi_key = \"sk_test_1\"\n",
            "connectors.stripe.api_version",
        ),
        (
            "[connectors.stripe]\nwebhook_tolerance = \"0s\"\n[connectors.stripe.accounts.s]\napi_key = \"sk_test_1\"\n",
            "connectors.stripe.webhook_tolerance",
        ),
        (
            "[connectors.cm]\nwebhook_tolerance = \"60s\"\n",
            "connectors.cm.webhook_tolerance",
        ),
        (
            "[processing]\nmax_in_flight = 0\n",
            "processing.max_in_flight",
        ),
        (
            "[processing]\nmax_in_flight = \"many\"\n",
            "processing.max_in_flight",
        ),
        (
            "[kafka]\ncommit_interval = \"soon\"\n",
            "kafka.commit_interval",
        ),
        (
            "[kafka]\noutput_topic = \"bad topic\"\n",
            "kafka.output_topic",
        ),
        ("[kafka]\nbrokrs = \"x\"\n", "kafka"),
        ("[http]\nlisten = \"nowhere\"\n", "http.listen"),
        (
            "[connectors.cm]\nbase_url = \"ftp://x\"\n",
            "connectors.cm.base_url",
        ),
        (
            "[connectors.cm]\nbase_url = \"https://user:pw@x\"\n",
            "connectors.cm.base_url",
        ),
        (
            "[connectors.cm]\nrequest_timeout = \"0s\"\n",
            "connectors.cm.request_timeout",
        ),
        (
            "[connectors.cm.circuit]\nfailure_threshold = 6\n",
            "connectors.cm.circuit.failure_threshold",
        ),
        (
            "[connectors.cm.rate_limit]\nrequests_per_second = 0\n",
            "connectors.cm.rate_limit.requests_per_second",
        ),
        (
            "[connectors.cm.accounts.x]\nclient_id = \"a\"\nclient_secret = \"b\"\nrequests_per_second = -1\n",
            "connectors.cm.accounts.x.requests_per_second",
        ),
        (
            "[connectors.nope]\nbase_url = \"https://x\"\n",
            "connectors.nope",
        ),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        (
            "[schema_registry]\nurl = \"not a url\"\n",
            "schema_registry.url",
        ),
        (
            "[kafka.producer]\nacks = \"0\"\n",
            "kafka.producer.\"acks\"",
        ),
        (
            "[kafka.producer]\n\"request.required.acks\" = \"1\"\n",
            "kafka.producer.\"request.required.acks\"",
        ),
        (
            "[kafka.common]\nacks = \"1\"\n",
            "kafka.common.\"acks\"",
        ),
        (
            "[kafka.producer]\n\"enable.idempotence\" = \"false\"\n",
            "kafka.producer.\"enable.idempotence\"",
        ),
        (
            "[kafka.producer]\n\"message.max.bytes\" = \"lots\"\n",
            "kafka.producer.\"message.max.bytes\"",
        ),
        (
            "[kafka.producer]\n\"message.max.bytes\" = \"70000\"\n",
            "processing.max_request_bytes",
        ),
        (
            "[processing]\nmax_request_bytes = 990000\n",
            "processing.max_request_bytes",
        ),
        (
            "[processing]\nshutdown_timeout = \"30d\"\n",
            "processing.shutdown_timeout",
        ),
        (
            "[processing]\naccepted_schema_ids = [-1]\n",
            "processing.accepted_schema_ids",
        ),
    ];
    for (extra, key) in cases {
        let err = load(&format!("{MINIMAL}\n{extra}"), &[]).unwrap_err();
        assert!(
            err.key.starts_with(key),
            "{extra:?}: got key {:?} ({})",
            err.key,
            err.message
        );
    }
    let err = load("", &[]).unwrap_err();
    assert_eq!(err.key, "connectors.cm");
    let err = load("[connectors.cm]\nrequest_timeout = \"1s\"\n", &[]).unwrap_err();
    assert_eq!(err.key, "connectors.cm.accounts");
    let err = load("[connectors.cm.accounts.default]\napi_key = \"k\"\n", &[]).unwrap_err();
    assert_eq!(err.key, "connectors.cm.accounts.default.client_id");
    assert!(
        err.message.contains("client_id, client_secret"),
        "{}",
        err.message
    );
    // The producer section wins over the common one; all and -1 are fine.
    let ok = load(
        &format!("{MINIMAL}\n[kafka.common]\nacks = \"1\"\n[kafka.producer]\nacks = \"-1\"\n\"message.max.bytes\" = \"2000000\"\n"),
        &[],
    )
    .unwrap();
    assert_eq!(ok.kafka.max_record_bytes, 2_000_000);
    let err = load(MINIMAL, &[("PAYSYNC_PROCESSING__MAX_IN_FLIGHT", "-5")]).unwrap_err();
    assert_eq!(err.key, "processing.max_in_flight");
}

#[test]
fn a_stripe_account_reads_its_key_mode_and_connected_account() {
    let s = load(
        &format!("{MINIMAL}\n[connectors.stripe]\nwebhook_tolerance = \"120s\"\n[connectors.stripe.accounts.platform]\napi_key = \"rk_live_restricted\"\nstripe_account = \"acct_1032D82eZvKYlo2C\"\nwebhook_secret = \"whsec_x\"\n"),
        &[],
    )
    .unwrap();
    let c = &s.connectors["stripe"];
    assert_eq!(c.gateway.api_version.as_deref(), Some("2022-11-15"));
    assert_eq!(c.webhook_tolerance, Duration::from_secs(120));
    assert_eq!(c.webhook_max_body_bytes, Some(1024 * 1024));
    let a = &c.gateway.accounts["platform"];
    assert_eq!(
        a.credential.mode(),
        Some(crate::connectors::auth::Mode::Live)
    );
    let shown = s.to_masked_toml();
    assert!(
        shown.contains("stripe_account = \"acct_1032D82eZvKYlo2C\""),
        "{shown}"
    );
    assert!(!shown.contains("rk_live_restricted"), "{shown}");
    assert!(!shown.contains("whsec_x"), "{shown}");
}

#[test]
fn secrets_never_print() {
    let s = load(
        &format!(
            "{MINIMAL}\n[kafka.common]\n\"sasl.password\" = \"kafka-pw\"\n[schema_registry]\nurl = \"http://r:8081\"\nusername = \"u\"\npassword = \"reg-pw\"\n"
        ),
        &[],
    )
    .unwrap();
    let shown = format!("{s:?}\n{}", s.to_masked_toml());
    for secret in ["s3cr3t-inline", "kafka-pw", "reg-pw"] {
        assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
    }
    assert!(s.to_masked_toml().contains("client_secret = \"********\""));
    assert!(s
        .to_masked_toml()
        .contains("\"sasl.password\" = \"********\""));
}

#[test]
fn follow_mode_tables_and_their_topics() {
    let s = load(
        &format!("{MINIMAL}\n[connectors.cm.follow]\n"),
        &[("PAYSYNC_PROCESSING__FOLLOW", "true")],
    )
    .unwrap();
    let f = s.connectors["cm"].follow.as_ref().unwrap();
    assert_eq!(
        f.schedule,
        vec![(Duration::from_secs(60), 1), (Duration::from_secs(300), 5)],
        "the default schedule"
    );
    assert_eq!(f.publish, PublishMode::Changes);
    assert!(s.processing.follow);
    assert_eq!(
        s.topics(),
        vec![
            "payment-status-requests",
            "payment-status-events",
            "payment-status-requests.dlq",
            "payment-status-requests.recheck.60s",
            "payment-status-requests.recheck.300s",
        ]
    );
    // No table, no follow mode and no re-check topics.
    let s = load(MINIMAL, &[]).unwrap();
    assert!(s.connectors["cm"].follow.is_none());
    assert_eq!(s.topics().len(), 3);
    // A prefix, a schedule, every_check; the environment can switch it on.
    let s = load(
        &format!("{MINIMAL}\n[kafka]\nrecheck_topic_prefix = \"rc\"\n[connectors.cm.follow]\nschedule = [[\"2s\", 3], [\"1m\", 1]]\npublish = \"every_check\"\n"),
        &[],
    )
    .unwrap();
    assert_eq!(
        s.connectors["cm"].follow.as_ref().unwrap().publish,
        PublishMode::EveryCheck
    );
    assert_eq!(
        s.recheck_topics().into_values().collect::<Vec<_>>(),
        vec!["rc.2s", "rc.60s"]
    );
    let s = load(
        MINIMAL,
        &[("PAYSYNC_CONNECTORS__CM__FOLLOW__PUBLISH", "changes")],
    )
    .unwrap();
    assert!(s.connectors["cm"].follow.is_some());
    for (table, key) in [
        (
            "schedule = [[\"500ms\", 1]]",
            "connectors.cm.follow.schedule",
        ),
        (
            "schedule = [[\"1.5s\", 1]]",
            "connectors.cm.follow.schedule",
        ),
        ("schedule = [[\"10s\", 0]]", "connectors.cm.follow.schedule"),
        ("schedule = []", "connectors.cm.follow.schedule"),
        (
            "schedule = [[\"soon\", 1]]",
            "connectors.cm.follow.schedule",
        ),
        ("publish = \"sometimes\"", "connectors.cm.follow.publish"),
        ("every = 1", "connectors.cm.follow"),
    ] {
        let err = load(
            &format!("{MINIMAL}\n[connectors.cm.follow]\n{table}\n"),
            &[],
        )
        .unwrap_err();
        assert!(err.key.starts_with(key), "{table}: {err}");
    }
}

#[test]
fn webhook_intake_settings_defaults_and_errors() {
    // Off without the table.
    assert!(load(MINIMAL, &[]).unwrap().webhooks.is_none());
    let s = load(&format!("{MINIMAL}[webhooks]\n"), &[]).unwrap();
    let w = s.webhooks.as_ref().unwrap();
    assert_eq!(w.listen.port(), 9465);
    assert!(w.follow);
    assert_eq!(w.max_body_bytes, 65536);
    assert_eq!(w.ack_timeout, Duration::from_secs(10));
    assert_eq!((w.requests_per_second, w.burst), (100, 200));
    assert_eq!(w.dedupe_window, Duration::from_secs(60));
    assert_eq!(w.header_read_timeout, Duration::from_secs(5));
    assert_eq!(w.body_read_timeout, Duration::from_secs(10));
    assert_eq!(w.max_connections, None);
    assert_eq!(w.idle_timeout, Duration::from_secs(60));
    assert_eq!(w.connection_lifetime, Duration::from_secs(600));
    assert_eq!(w.max_requests_per_connection, 1000);
    assert_eq!(w.write_timeout, Duration::from_secs(30));
    assert_eq!((w.max_headers, w.max_header_bytes), (64, 16384));
    assert!(w.trusted_proxies.is_empty() && w.tls.is_none());
    let s = load(
        &format!(
            "{MINIMAL}[webhooks]
trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]\nmax_connections = 4096\n"
        ),
        &[],
    )
    .unwrap();
    let w = s.webhooks.unwrap();
    assert_eq!(w.trusted_proxies.len(), 2);
    assert!(w.trusted_proxies[1].contains(&"192.0.2.7".parse::<std::net::IpAddr>().unwrap()));
    assert_eq!(w.max_connections, Some(4096));
    // Zero turns deduplication off; a zero ack timeout is refused.
    let s = load(
        &format!("{MINIMAL}[webhooks]\ndedupe_window = \"0s\"\n"),
        &[],
    )
    .unwrap();
    assert_eq!(s.webhooks.unwrap().dedupe_window, Duration::ZERO);
    let cases: &[(&str, &str)] = &[
        ("[webhooks]\nack_timeout = \"0s\"\n", "webhooks.ack_timeout"),
        ("[webhooks]\nlisten = \"port 80\"\n", "webhooks.listen"),
        ("[webhooks]\nmax_body_bytes = 1\n", "webhooks.max_body_bytes"),
        ("[webhooks]\nrequests_per_second = 0\n", "webhooks.requests_per_second"),
        ("[webhooks]\nheader_read_timeout = \"0s\"\n", "webhooks.header_read_timeout"),
        ("[webhooks]\ntrusted_proxies = [\"the proxy\"]\n", "webhooks.trusted_proxies"),
        ("[webhooks]\ntls_cert = \"cert.pem\"\n", "webhooks.tls_key"),
        ("[webhooks]\ntls_key = \"key.pem\"\n", "webhooks.tls_cert"),
        ("[webhooks]\nmax_headers = 1\n", "webhooks.max_headers"),
        ("[webhooks]\nmax_connections = 0\n", "webhooks.max_connections"),
        ("[webhooks]\nwrite_timeout = \"0s\"\n", "webhooks.write_timeout"),
        // CM.com signs no webhooks: a secret there would protect nothing.
        (
            "[connectors.cm.accounts.shop]\nclient_id = \"a\"\nclient_secret = \"b\"\nwebhook_secret = \"whsec_unused\"\n",
            "connectors.cm.accounts.shop.webhook_secret",
        ),
        (
            "[connectors.mollie.accounts.shop]\napi_key = \"test_abcdefghijklmnopqrstuvwxyz0123\"\nwebhook_path_token = \"short\"\n",
            "connectors.mollie.accounts.shop.webhook_path_token",
        ),
        (
            "[connectors.mollie.accounts.shop]\napi_key = \"test_abcdefghijklmnopqrstuvwxyz0123\"\nwebhook_path_token = \"has/a/slash/in/it/abc\"\n",
            "connectors.mollie.accounts.shop.webhook_path_token",
        ),
    ];
    for (toml, key) in cases {
        let e = load(&format!("{MINIMAL}{toml}"), &[]).unwrap_err();
        assert_eq!(e.key, *key, "{toml}: {e}");
    }
    // Webhook secrets and path tokens are masked like the other secrets.
    let s = load(
        &format!(
            "{MINIMAL}[connectors.mollie.accounts.shop]\napi_key = \"test_abcdefghijklmnopqrstuvwxyz0123\"\nwebhook_secret = \"whsec_do_not_print\"\nwebhook_path_token = \"pt_do_not_print_0123\"\n"
        ),
        &[],
    )
    .unwrap();
    let shown = format!("{s:?}\n{}", s.to_masked_toml());
    for secret in ["whsec_do_not_print", "pt_do_not_print_0123"] {
        assert!(!shown.contains(secret), "{secret} leaked");
    }
}
