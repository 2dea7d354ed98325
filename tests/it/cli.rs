//! The binary as an operator meets it: configuration refused before
//! listening, configuration layers, `subgate token`, `subgate schema`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

/// A misconfigured node must exit on its own, fast; this bounds a hang.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn bad_configuration_exits_non_zero_before_listening_naming_the_key() {
    // A port taken by someone else is a configuration problem too.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let dir = TempDir::new();
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("server.port", vec![("SUBGATE__SERVER__PORT", "70000")]),
        (
            "server.port",
            vec![("SUBGATE__SERVER__PORT", taken_port.as_str())],
        ),
        ("environment", vec![("SUBGATE__ENVIRONMENT", "staging")]),
        (
            "auth.jwt_public_key_file",
            vec![("SUBGATE__AUTH__JWT_PUBLIC_KEY_FILE", "/nope")],
        ),
        // Production has no development secret, and a short one is refused.
        (
            "auth.jwt_secret",
            vec![("SUBGATE__ENVIRONMENT", "production")],
        ),
        (
            "auth.jwt_secret",
            vec![
                ("SUBGATE__ENVIRONMENT", "production"),
                ("SUBGATE__AUTH__JWT_SECRET", "short"),
            ],
        ),
        (
            "server.max_body_bytes",
            vec![("SUBGATE__SERVER__MAX_BODY_BYTES", "0")],
        ),
        (
            "server.allowed_origins",
            vec![("SUBGATE__SERVER__ALLOWED_ORIGINS", "app.example.com")],
        ),
        (
            "websocket.max_frame_bytes",
            vec![("SUBGATE__WEBSOCKET__MAX_FRAME_BYTES", "lots")],
        ),
        (
            "redis.url",
            vec![("SUBGATE__REDIS__URL", "http://localhost:6379")],
        ),
        // The right scheme, but no Redis connection can be made of it.
        (
            "redis.url",
            vec![("SUBGATE__REDIS__URL", "redis://127.0.0.1:notaport")],
        ),
    ];
    // Each refusal is its own process; run them side by side.
    let results: Vec<_> = std::thread::scope(|scope| {
        let runs: Vec<_> = cases
            .into_iter()
            .map(|(key, mut env)| {
                let dir = dir.path();
                scope.spawn(move || {
                    if !env.iter().any(|(k, _)| *k == "SUBGATE__SERVER__PORT") {
                        // Port 0: if the node wrongly accepts the config, it still starts cleanly.
                        env.push(("SUBGATE__SERVER__PORT", "0"));
                    }
                    let out = run_cli(&[], &env, dir, REFUSAL_TIMEOUT);
                    (
                        key,
                        env.iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>(),
                        out,
                    )
                })
            })
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    });
    for (key, env, out) in results {
        assert!(
            !out.status.success(),
            "{env:?} must be refused (exit non-zero), got {:?}\nstderr:\n{}",
            out.status,
            out.stderr
        );
        assert!(
            !out.stderr.contains("listening on"),
            "{env:?} must be refused before listening:\n{}",
            out.stderr
        );
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{env:?} must be refused with one line, got:\n{}",
            out.stderr
        );
        assert!(
            lines[0].contains(key),
            "{env:?}: the refusal must name `{key}`, got: {}",
            lines[0]
        );
    }
    drop(taken);
}

#[test]
fn every_configuration_problem_is_one_line_of_one_refusal() {
    // Wrong types, an unknown key, an unknown choice and a bad value, from
    // a file and the environment: the operator sees all of them at once.
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("extra.toml"),
        "[server]\nmax_body_bytes = \"big\"\n[websocket]\nping_intervall_seconds = 5\n",
    )
    .unwrap();
    let env = [
        ("SUBGATE__SERVER__PORT", "0"),
        ("SUBGATE__HUB__SUBSCRIBER_QUEUE_CAPACITY", "many"),
        ("SUBGATE__LOG__FORMAT", "xml"),
    ];
    let out = run_cli(
        &["--config", "extra.toml"],
        &env,
        dir.path(),
        REFUSAL_TIMEOUT,
    );
    assert!(!out.status.success(), "must be refused:\n{}", out.stderr);
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    for key in [
        "server.max_body_bytes",
        "websocket.ping_intervall_seconds",
        "hub.subscriber_queue_capacity",
        "log.format",
    ] {
        assert_eq!(
            lines.iter().filter(|l| l.contains(key)).count(),
            1,
            "`{key}` must be named on one line:\n{}",
            out.stderr
        );
    }
    assert_eq!(lines.len(), 4, "one line per problem:\n{}", out.stderr);
}

#[tokio::test]
async fn configuration_layers_files_then_environment() {
    // Four layers, each with a key that only it or a later one sets:
    // config/default.toml < config/$SUBGATE_ENV.toml < --config FILE < SUBGATE__ variables.
    let env = [
        ("SUBGATE_ENV", "ci"),
        ("SUBGATE__GRAPHQL__MAX_BATCH_SIZE", "4"),
    ];
    let node = Node::start_with(&["--config", "extra.toml"], &env, |dir| {
        std::fs::create_dir_all(dir.join("config")).unwrap();
        let default =
            "[graphql]\nmax_batch_size = 2\nmax_depth = 3\nmax_aliases = 50\nmax_page_size = 100\n";
        std::fs::write(dir.join("config/default.toml"), default).unwrap();
        std::fs::write(
            dir.join("config/ci.toml"),
            "[graphql]\nmax_aliases = 20\nmax_page_size = 7\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("extra.toml"),
            "[graphql]\nmax_batch_size = 3\nmax_aliases = 1\n",
        )
        .unwrap();
    });
    // config/ci.toml (max_page_size 7) beats config/default.toml (100).
    let reply = post_json(
        &node,
        &json!({ "query": "{ posts(first: 7) { totalCount } }" }),
        None,
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "first: 7 with config/ci.toml max_page_size = 7: {}",
        reply.body
    );
    let reply = post_json(
        &node,
        &json!({ "query": "{ posts(first: 8) { totalCount } }" }),
        None,
    )
    .await;
    assert!(
        !error_messages(&reply.json()).is_empty(),
        "first: 8 with config/ci.toml max_page_size = 7: {}",
        reply.body
    );
    // The environment (4) beats both files (2, 3).
    let batch = |n: usize| {
        serde_json::Value::Array(
            (0..n)
                .map(|_| json!({ "query": "{ __typename }" }))
                .collect(),
        )
    };
    let reply = post_json(&node, &batch(4), None).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the environment (4) must override the files: {}",
        reply.body
    );
    let reply = post_json(&node, &batch(5), None).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "a batch of 5 over a limit of 4: {}",
        reply.body
    );
    // --config (max_aliases 1) beats config/ci.toml (20) and config/default.toml (50).
    let reply = post_json(&node, &json!({ "query": "{ a: __typename }" }), None).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "one alias with max_aliases = 1: {}",
        reply.body
    );
    let reply = post_json(
        &node,
        &json!({ "query": "{ a: __typename b: __typename }" }),
        None,
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "two aliases with --config max_aliases = 1: {}",
        reply.body
    );
    // config/default.toml in the working directory applies where nothing
    // overrides it: max_depth 3 refuses depth 4.
    let deep = "{ __schema { queryType { fields { name } } } }";
    let reply = post_json(&node, &json!({ "query": deep }), None).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "depth 4 with config/default.toml max_depth = 3: {}",
        reply.body
    );
    let reply = post_json(
        &node,
        &json!({ "query": "{ __schema { queryType { name } } }" }),
        None,
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "depth 3 with max_depth = 3: {}",
        reply.body
    );

    // A --config file that does not exist is refused, naming the option.
    let dir = TempDir::new();
    let out = run_cli(
        &["--config", "missing.toml"],
        &[("SUBGATE__SERVER__PORT", "0")],
        dir.path(),
        REFUSAL_TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "a missing --config file must be refused:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("--config") || out.stderr.contains("missing.toml"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn subgate_token_mints_a_token_the_node_accepts() {
    let node = Node::start(&[]);
    let token = cli_token(
        &node,
        &["--sub", "user-42", "--ttl", "1h", "--scope", "publish"],
    );
    assert_eq!(
        token.lines().count(),
        1,
        "`subgate token` prints the token alone: {token:?}"
    );
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");
    let claims = jwt::claims(&token);
    assert_eq!(claims["sub"], "user-42", "{claims}");
    let ttl = claims["exp"].as_i64().expect("exp") - jwt::now();
    assert!(
        (3500..=3700).contains(&ttl),
        "--ttl 1h must give exp ~ now + 3600, got now + {ttl}"
    );
    assert!(
        claims["scope"]
            .as_str()
            .unwrap_or("")
            .split(' ')
            .any(|s| s == "publish"),
        "--scope publish must be in the scope claim: {claims}"
    );
    // The node verifies it: the request runs instead of answering 401.
    let reply = post_json(&node, &json!({ "query": "{ __typename }" }), Some(&token)).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "a token from `subgate token` refused: {}",
        reply.body
    );
    // A token minted with another secret is not: the check above can fail.
    let other = run_cli(
        &["token", "--sub", "user-42"],
        &[(
            "SUBGATE__AUTH__JWT_SECRET",
            "a-different-secret-for-this-one-run-only",
        )],
        node.dir(),
        REFUSAL_TIMEOUT,
    );
    assert!(other.status.success(), "{}", other.stderr);
    let reply = post_json(
        &node,
        &json!({ "query": "{ __typename }" }),
        Some(other.stdout.trim()),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "a token signed with another secret: {}",
        reply.body
    );
}

#[test]
fn subgate_schema_prints_the_sdl_kept_in_the_repository() {
    let dir = TempDir::new();
    let out = run_cli(&["schema"], &[], dir.path(), REFUSAL_TIMEOUT);
    assert!(
        out.status.success(),
        "`subgate schema` failed: {:?}\n{}",
        out.status,
        out.stderr
    );
    let sdl = out.stdout;
    for needle in [
        "type Query",
        "type Mutation",
        "type Subscription",
        "scalar DateTime",
        "scalar JSON",
        "enum ErrorCode",
        "type UserError",
        "type PageInfo",
        "postCreated",
        "notificationReceived",
        "messageReceived(",
        "events(",
        "createUser(",
        "sendMessage(",
    ] {
        assert!(sdl.contains(needle), "the SDL lacks `{needle}`:\n{sdl}");
    }
    // INTERFACE.md: schema.graphql at the repository root is the SDL, kept identical.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql");
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} must exist: {e}", path.display()));
    assert!(
        committed.trim_end() == sdl.trim_end(),
        "schema.graphql differs from `subgate schema`; regenerate it"
    );
}

/// A secret long enough for production, and not the development one.
const PRODUCTION_SECRET: &str = "production-secret-of-at-least-32-bytes!";

#[tokio::test]
async fn subgate_env_production_is_production_without_its_file() {
    // An empty working directory: no config/production.toml to say so.
    let dir = TempDir::new();
    let env = [
        ("SUBGATE_ENV", "production"),
        ("SUBGATE__SERVER__PORT", "0"),
    ];
    let out = run_cli(&[], &env, dir.path(), REFUSAL_TIMEOUT);
    assert!(
        !out.status.success(),
        "production without a secret must refuse to start:\n{}",
        out.stderr
    );
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line:\n{}", out.stderr);
    assert!(lines[0].contains("auth.jwt_secret"), "{}", out.stderr);

    // The public development secret, set explicitly, is no secret.
    let dev_secret = [
        ("SUBGATE_ENV", "production"),
        ("SUBGATE__SERVER__PORT", "0"),
        (
            "SUBGATE__AUTH__JWT_SECRET",
            "subgate-development-secret-do-not-use-in-production",
        ),
    ];
    let out = run_cli(&[], &dev_secret, dir.path(), REFUSAL_TIMEOUT);
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("auth.jwt_secret"), "{}", out.stderr);

    // With a real secret it starts, as production: no introspection, and
    // the start-up log says which environment it is.
    let node = Node::start(&[
        ("SUBGATE_ENV", "production"),
        ("SUBGATE__AUTH__JWT_SECRET", PRODUCTION_SECRET),
    ]);
    let reply = post_json(
        &node,
        &json!({ "query": "{ __schema { queryType { name } } }" }),
        None,
    )
    .await;
    assert!(
        reply.json()["data"]["__schema"].is_null() && !error_messages(&reply.json()).is_empty(),
        "a production node refuses introspection: {}",
        reply.body
    );
    let log = node.stderr_text();
    let line = log
        .lines()
        .find(|l| l.contains("\"environment\":\"production\""))
        .unwrap_or_else(|| panic!("a JSON log line naming the environment:\n{log}"));
    // Production's own defaults apply without config/production.toml.
    assert!(line.contains("\"drain_grace_seconds\":5"), "{line}");
    assert!(line.contains("none (built-in defaults)"), "{line}");
    assert!(
        !line.contains(PRODUCTION_SECRET),
        "secrets stay out: {line}"
    );
}

#[test]
fn an_environment_that_is_asked_for_must_exist_and_agree() {
    let dir = TempDir::new();
    let port = ("SUBGATE__SERVER__PORT", "0");
    for (env, key) in [
        // A name other than the built-in ones needs its file.
        (vec![("SUBGATE_ENV", "staging"), port], "SUBGATE_ENV"),
        // Two answers to one question.
        (
            vec![
                ("SUBGATE_ENV", "production"),
                ("SUBGATE__ENVIRONMENT", "development"),
                ("SUBGATE__AUTH__JWT_SECRET", PRODUCTION_SECRET),
                port,
            ],
            "environment",
        ),
    ] {
        let out = run_cli(&[], &env, dir.path(), REFUSAL_TIMEOUT);
        assert!(!out.status.success(), "{env:?}:\n{}", out.stderr);
        let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "{env:?}:\n{}", out.stderr);
        assert!(lines[0].contains(key), "{env:?} names {key}: {}", lines[0]);
    }
}

#[test]
fn the_start_up_log_names_the_environment_and_the_files_layered() {
    let node = Node::start_with(&[], &[("SUBGATE_ENV", "ci")], |dir| {
        std::fs::create_dir_all(dir.join("config")).unwrap();
        std::fs::write(dir.join("config/default.toml"), "[server]\nworkers = 1\n").unwrap();
        std::fs::write(
            dir.join("config/ci.toml"),
            "[server]\ndrain_timeout_seconds = 7\n",
        )
        .unwrap();
    });
    let log = node.stderr_text();
    let line = log
        .lines()
        .find(|l| l.contains("configuration: environment development"))
        .unwrap_or_else(|| panic!("a line naming the environment:\n{log}"));
    let default = line.find("config/default.toml");
    let ci = line.find("config/ci.toml");
    assert!(
        default.is_some() && ci.is_some() && default < ci,
        "both files, in layering order: {line}"
    );
    assert!(line.contains("drain_timeout_seconds=7"), "{line}");
    assert!(
        !line.contains(SECRET),
        "secrets stay out of the log: {line}"
    );
}

#[test]
fn subgate_config_prints_the_effective_settings_with_secrets_redacted() {
    let dir = TempDir::new();
    let api_key = "publish-key-0123456789abcdef";
    let env = [
        ("SUBGATE__AUTH__JWT_SECRET", PRODUCTION_SECRET),
        ("SUBGATE__PUBLISH__API_KEYS", api_key),
        (
            "SUBGATE__REDIS__URL",
            "redis://app:hunter2-password@127.0.0.1:6390/0",
        ),
        ("SUBGATE__SERVER__DRAIN_TIMEOUT_SECONDS", "12"),
    ];
    let out = run_cli(&["config"], &env, dir.path(), REFUSAL_TIMEOUT);
    assert!(out.status.success(), "{:?}\n{}", out.status, out.stderr);
    for secret in [PRODUCTION_SECRET, api_key, "hunter2-password"] {
        assert!(
            !out.stdout.contains(secret),
            "{secret} leaked:\n{}",
            out.stdout
        );
    }
    let config: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("JSON on stdout ({e}):\n{}", out.stdout));
    assert_eq!(config["environment"], "development");
    assert_eq!(config["server"]["drain_timeout_seconds"], 12);
    assert_eq!(config["auth"]["jwt_secret"], "<redacted>");
    assert_eq!(config["publish"]["api_keys"], json!(["<redacted>"]));
    assert_eq!(
        config["redis"]["url"],
        "redis://app:<redacted>@127.0.0.1:6390/0"
    );

    // A configuration that cannot run is not printed: the usual refusal.
    let out = run_cli(
        &["config"],
        &[("SUBGATE__SERVER__MAX_BODY_BYTES", "0")],
        dir.path(),
        REFUSAL_TIMEOUT,
    );
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("server.max_body_bytes"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}
