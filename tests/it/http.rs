//! GraphQL over HTTP (graphql-over-http spec) and the operational endpoints.
//!
//! These use only `__typename` and introspection (`__type`), which every
//! schema has, so that they test the transport and not the domain.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn health_readiness_and_metrics_endpoints() {
    let node = Node::start(&[]);

    let health = get(&node, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK, "/healthz: {}", health.body);
    let ready = get(&node, "/readyz").await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "/readyz on an idle in-memory node: {}",
        ready.body
    );

    // Two operations, so that the operation counter has something to show.
    for _ in 0..2 {
        gql_ok(&node, "{ __typename }", json!({}), None).await;
    }

    let metrics = get(&node, "/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK, "/metrics: {}", metrics.body);
    let content_type = metrics.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("text/plain"),
        "/metrics is Prometheus text, got content type {content_type:?}"
    );

    let mut names = std::collections::BTreeSet::new();
    for line in metrics.body.lines().filter(|l| !l.trim().is_empty()) {
        let name = if let Some(rest) = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
        {
            rest.split(' ').next().unwrap_or("")
        } else {
            line.split(['{', ' ']).next().unwrap_or("")
        };
        assert!(
            name.starts_with("subgate_"),
            "metric {name:?} lacks the subgate_ prefix (line {line:?})"
        );
        names.insert(name.to_owned());
        // Prometheus naming: counters end in _total.
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split(' ');
            let (name, kind) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "counter {name} does not end in _total"
                );
            }
        }
    }
    assert!(
        metric_sum(&metrics.body, "subgate_graphql_operations_total") >= 2.0,
        "the two queries are not counted in subgate_graphql_operations_total:\n{}",
        metrics.body
    );
    assert!(names.len() > 3, "suspiciously few metrics: {names:?}");
}

#[tokio::test]
async fn post_negotiates_content_types_and_refuses_bad_requests() {
    let node = Node::start(&[
        ("SUBGATE__SERVER__MAX_BODY_BYTES", "2048"),
        ("SUBGATE__GRAPHQL__MAX_BATCH_SIZE", "3"),
    ]);
    let query = json!({ "query": "{ __typename }" }).to_string();

    // The spec's media type when the client accepts it...
    let reply = post_raw(&node, Some("application/json"), query.clone(), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(
        reply
            .header("content-type")
            .unwrap_or("")
            .starts_with(GRAPHQL_RESPONSE_JSON),
        "Accept: {GRAPHQL_RESPONSE_JSON} must be honoured, got {:?}",
        reply.header("content-type")
    );
    assert_eq!(reply.json(), json!({ "data": { "__typename": "Query" } }));

    // ...and application/json for a client that accepts only that, or says nothing.
    for accept in [Some("application/json"), None] {
        let mut request = node
            .http
            .post(node.http_url("/graphql"))
            .header("content-type", "application/json")
            .body(query.clone());
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(
            content_type.starts_with("application/json"),
            "Accept {accept:?} answered with {content_type:?}"
        );
    }

    // A charset parameter is still JSON.
    let reply = post_raw(
        &node,
        Some("application/json; charset=utf-8"),
        query.clone(),
        None,
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "application/json with a charset: {}",
        reply.body
    );

    // CSRF: what a cross-site HTML form can send is refused, and so is no type at all.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let reply = post_raw(&node, content_type, query.clone(), None).await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "POST with content type {content_type:?} must be 415, got {}: {}",
            reply.status,
            reply.body
        );
    }

    // Bodies that are not a GraphQL request, and documents that do not parse or validate.
    let bad_requests: [(&str, String); 5] = [
        (
            "unparseable JSON",
            r#"{"query": "{ __typename }""#.to_owned(),
        ),
        ("JSON that is not a request", r#"{"foo": 1}"#.to_owned()),
        (
            "a document that does not parse",
            json!({ "query": "{ __typename " }).to_string(),
        ),
        (
            "a field that does not exist",
            json!({ "query": "{ noSuchField }" }).to_string(),
        ),
        (
            "a missing required variable",
            json!({ "query": "query($name: String!) { __type(name: $name) { name } }" })
                .to_string(),
        ),
    ];
    for (what, body) in bad_requests {
        let reply = post_raw(&node, Some("application/json"), body, None).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{what} must be 400, got {}: {}",
            reply.status,
            reply.body
        );
        let errors = reply.json()["errors"].clone();
        assert!(
            errors
                .as_array()
                .is_some_and(|e| !e.is_empty() && e[0]["message"].is_string()),
            "{what}: a 400 carries GraphQL errors with messages, got {}",
            reply.body
        );
    }

    // server.max_body_bytes = 2048: a body just under it passes, one over it is 413.
    let padded = |total: usize| {
        let base = json!({ "query": "{ __typename }", "extensions": { "pad": "" } }).to_string();
        json!({ "query": "{ __typename }", "extensions": { "pad": "x".repeat(total - base.len()) } }).to_string()
    };
    let reply = post_raw(&node, Some("application/json"), padded(2000), None).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "a 2000-byte body under a 2048-byte limit: {}",
        reply.body
    );
    let reply = post_raw(&node, Some("application/json"), padded(3000), None).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "a 3000-byte body over a 2048-byte limit: {}",
        reply.body
    );

    // graphql.max_batch_size = 3: three operations run, in order; four are refused.
    let batch = |n: usize| {
        Value::Array(
            (0..n)
                .map(|i| json!({ "query": format!("{{ op{i}: __typename }}") }))
                .collect(),
        )
    };
    let reply = post_json(&node, &batch(3), None).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "a batch of 3 with max_batch_size 3: {}",
        reply.body
    );
    let results = reply.json();
    let results = results
        .as_array()
        .unwrap_or_else(|| panic!("a batch answers with a list: {}", reply.body));
    assert_eq!(results.len(), 3);
    for (i, result) in results.iter().enumerate() {
        assert_eq!(
            result["data"][format!("op{i}")],
            "Query",
            "batch result {i} out of order: {}",
            reply.body
        );
    }
    let reply = post_json(&node, &batch(4), None).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "a batch of 4 with max_batch_size 3: {}",
        reply.body
    );
}

#[tokio::test]
async fn get_runs_queries_only_and_variables_and_operation_name_are_honoured() {
    let node = Node::start(&[]);

    let reply = get_graphql(&node, "{ __typename }", None, None).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "a query over GET: {}",
        reply.body
    );
    assert_eq!(reply.json()["data"]["__typename"], "Query");

    // Mutations change state, so a GET (which caches, prefetches and is
    // sent by <img> tags) must not run them.
    let reply = get_graphql(&node, "mutation { __typename }", None, None).await;
    assert_eq!(
        reply.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "a mutation over GET: {}",
        reply.body
    );
    assert_eq!(
        reply.header("allow"),
        Some("POST"),
        "405 must say which method to use"
    );

    let reply = node
        .http
        .get(node.http_url("/graphql"))
        .header("accept", GRAPHQL_RESPONSE_JSON)
        .send()
        .await
        .unwrap();
    assert_eq!(
        reply.status(),
        StatusCode::BAD_REQUEST,
        "GET /graphql without a query"
    );

    // Variables, over POST and GET.
    let by_name = "query TypeByName($name: String!) { __type(name: $name) { name } }";
    let data = gql_ok(&node, by_name, json!({ "name": "Query" }), None).await;
    assert_eq!(data["__type"]["name"], "Query", "variables over POST");
    let reply = get_graphql(&node, by_name, Some(&json!({ "name": "Query" })), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.json()["data"]["__type"]["name"],
        "Query",
        "variables over GET: {}",
        reply.body
    );

    // operationName picks one of several operations, over POST and GET.
    let two = "query First { first: __typename } query Second { second: __typename }";
    let reply = post_json(
        &node,
        &json!({ "query": two, "operationName": "Second" }),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.json()["data"],
        json!({ "second": "Query" }),
        "operationName over POST: {}",
        reply.body
    );
    let reply = get_graphql(&node, two, None, Some("First")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.json()["data"],
        json!({ "first": "Query" }),
        "operationName over GET: {}",
        reply.body
    );
    // Without operationName the choice is ambiguous: a request error.
    let reply = post_json(&node, &json!({ "query": two }), None).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "two operations and no operationName: {}",
        reply.body
    );
}

#[tokio::test]
async fn execution_errors_answer_200_and_only_unrun_requests_answer_400() {
    // GraphQL over HTTP, application/graphql-response+json: a response with
    // a `data` entry (even null) means the operation ran, so the status is
    // 200; 4xx is for requests that did not run (parse, validation).
    let node = Node::start(&[]);
    let ran = post_json(
        &node,
        &json!({ "query": "{ posts(first: 5, after: \"garbage\") { totalCount } }" }),
        None,
    )
    .await;
    let response = ran.json();
    assert!(
        response.get("data").is_some() && !error_messages(&response).is_empty(),
        "{}",
        ran.body
    );
    assert!(
        response["errors"][0]["path"].is_array(),
        "an error raised while resolving carries its path: {}",
        ran.body
    );
    assert_eq!(
        ran.status,
        StatusCode::OK,
        "an execution error (data present, null) must be 200: {}",
        ran.body
    );

    // A nullable field that fails leaves the rest of the data: 200 too.
    let user = create_user(&node, "Partial").await;
    let query = "query($id: ID!) { __typename user(id: $id) { posts(first: 101) { totalCount } } }";
    let partial = post_json(
        &node,
        &json!({ "query": query, "variables": { "id": user.id } }),
        None,
    )
    .await;
    assert_eq!(partial.status, StatusCode::OK, "{}", partial.body);
    let response = partial.json();
    assert_eq!(
        response["data"],
        json!({ "__typename": "Query", "user": null }),
        "{}",
        partial.body
    );
    assert!(!error_messages(&response).is_empty(), "{}", partial.body);

    let unrun = post_json(
        &node,
        &json!({ "query": "{ posts(first: \"five\") { totalCount } }" }),
        None,
    )
    .await;
    assert_eq!(
        unrun.status,
        StatusCode::BAD_REQUEST,
        "a document that does not validate: {}",
        unrun.body
    );
}
