//! The schema as a client uses it over HTTP: mutation payload errors,
//! cursor pagination, notifications, document limits, introspection.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

const CREATE_USER: &str =
    "mutation($input: CreateUserInput!) { createUser(input: $input) { user { id email name } errors { field message code } } }";

#[tokio::test]
async fn mutations_report_user_errors_in_their_payloads() {
    let node = Node::start(&[]);

    // VALIDATION_ERROR, naming the field.
    let data = gql_ok(
        &node,
        CREATE_USER,
        json!({ "input": { "email": "not-an-email", "name": "Ann", "password": "long enough password" } }),
        None,
    )
    .await;
    assert!(data["createUser"]["user"].is_null(), "{data}");
    assert_eq!(
        payload_errors(&data["createUser"]),
        vec![("VALIDATION_ERROR".to_owned(), Some("email".to_owned()))]
    );

    // A good sign-up, then the same email again: CONFLICT.
    let email = format!("{}@example.com", unique("ann-"));
    let input =
        json!({ "input": { "email": email, "name": "Ann", "password": "long enough password" } });
    let data = gql_ok(&node, CREATE_USER, input.clone(), None).await;
    assert_eq!(payload_errors(&data["createUser"]), vec![], "{data}");
    let ann = data["createUser"]["user"].clone();
    assert_eq!(ann["email"], email.as_str());
    assert_eq!(ann["name"], "Ann");
    let ann_id = ann["id"].as_str().expect("user id").to_owned();
    let data = gql_ok(&node, CREATE_USER, input, None).await;
    assert!(data["createUser"]["user"].is_null(), "{data}");
    let errors = payload_errors(&data["createUser"]);
    assert_eq!(errors.len(), 1, "{data}");
    assert_eq!(errors[0].0, "CONFLICT", "a taken email: {data}");

    // login: the right password yields a token that works; a wrong one none.
    let login = "mutation($input: LoginInput!) { login(input: $input) { token user { id } errors { code } } }";
    let data = gql_ok(
        &node,
        login,
        json!({ "input": { "email": email, "password": "wrong password!" } }),
        None,
    )
    .await;
    assert!(
        data["login"]["token"].is_null(),
        "a wrong password must not log in: {data}"
    );
    assert!(!payload_errors(&data["login"]).is_empty(), "{data}");
    let data = gql_ok(
        &node,
        login,
        json!({ "input": { "email": email, "password": "long enough password" } }),
        None,
    )
    .await;
    assert_eq!(payload_errors(&data["login"]), vec![], "{data}");
    let ann_token = data["login"]["token"]
        .as_str()
        .expect("a login token")
        .to_owned();
    let me = gql_ok(&node, "{ me { id email } }", json!({}), Some(&ann_token)).await;
    assert_eq!(
        me["me"]["id"],
        ann_id.as_str(),
        "`me` with the login token: {me}"
    );
    let me = gql_ok(&node, "{ me { id } }", json!({}), None).await;
    assert!(me["me"].is_null(), "`me` is null when anonymous: {me}");

    // UNAUTHORIZED: writes that need a caller.
    let create_post = "mutation($input: CreatePostInput!) { createPost(input: $input) { post { id title author { id } } errors { field code } } }";
    let data = gql_ok(
        &node,
        create_post,
        json!({ "input": { "title": "Hello", "content": "..." } }),
        None,
    )
    .await;
    assert!(data["createPost"]["post"].is_null(), "{data}");
    assert_eq!(
        payload_errors(&data["createPost"])
            .first()
            .map(|e| e.0.as_str()),
        Some("UNAUTHORIZED"),
        "{data}"
    );
    let send = "mutation($input: SendMessageInput!) { sendMessage(input: $input) { message { id } errors { code } } }";
    let data = gql_ok(
        &node,
        send,
        json!({ "input": { "channelId": "nope", "content": "hi" } }),
        None,
    )
    .await;
    assert_eq!(
        payload_errors(&data["sendMessage"])
            .first()
            .map(|e| e.0.as_str()),
        Some("UNAUTHORIZED"),
        "{data}"
    );

    // VALIDATION_ERROR for an empty title.
    let data = gql_ok(
        &node,
        create_post,
        json!({ "input": { "title": "  ", "content": "..." } }),
        Some(&ann_token),
    )
    .await;
    assert!(data["createPost"]["post"].is_null(), "{data}");
    assert_eq!(
        payload_errors(&data["createPost"]),
        vec![("VALIDATION_ERROR".to_owned(), Some("title".to_owned()))]
    );

    // A good post, readable back with its author.
    let data = gql_ok(
        &node,
        create_post,
        json!({ "input": { "title": "Hello", "content": "world" } }),
        Some(&ann_token),
    )
    .await;
    assert_eq!(payload_errors(&data["createPost"]), vec![], "{data}");
    let post_id = data["createPost"]["post"]["id"]
        .as_str()
        .expect("post id")
        .to_owned();
    assert_eq!(data["createPost"]["post"]["author"]["id"], ann_id.as_str());
    let read = gql_ok(
        &node,
        "query($id: ID!) { post(id: $id) { title content author { id } } }",
        json!({ "id": post_id }),
        None,
    )
    .await;
    assert_eq!(
        read["post"],
        json!({ "title": "Hello", "content": "world", "author": { "id": ann_id } })
    );

    // NOT_FOUND for ids that do not exist.
    let update_post = "mutation($input: UpdatePostInput!) { updatePost(input: $input) { post { id title } errors { field code } } }";
    let delete_post = "mutation($input: DeletePostInput!) { deletePost(input: $input) { post { id } errors { field code } } }";
    let comment = "mutation($input: CreateCommentInput!) { createComment(input: $input) { comment { id } errors { field code } } }";
    for (name, query, input) in [
        (
            "updatePost",
            update_post,
            json!({ "id": "no-such-post", "title": "x" }),
        ),
        ("deletePost", delete_post, json!({ "id": "no-such-post" })),
        (
            "createComment",
            comment,
            json!({ "postId": "no-such-post", "content": "x" }),
        ),
    ] {
        let data = gql_ok(&node, query, json!({ "input": input }), Some(&ann_token)).await;
        assert_eq!(
            payload_errors(&data[name]).first().map(|e| e.0.as_str()),
            Some("NOT_FOUND"),
            "{name}: {data}"
        );
    }

    // Someone else may not edit Ann's post, and it stays as it was.
    let bob = create_user(&node, "Bob").await;
    let data = gql_ok(
        &node,
        update_post,
        json!({ "input": { "id": post_id, "title": "hijacked" } }),
        Some(&bob.token),
    )
    .await;
    assert!(data["updatePost"]["post"].is_null(), "{data}");
    assert_eq!(
        payload_errors(&data["updatePost"])
            .first()
            .map(|e| e.0.as_str()),
        Some("FORBIDDEN"),
        "{data}"
    );
    let data = gql_ok(
        &node,
        update_post,
        json!({ "input": { "id": post_id, "title": "Hello again" } }),
        Some(&ann_token),
    )
    .await;
    assert_eq!(data["updatePost"]["post"]["title"], "Hello again", "{data}");

    // Deleting the account leaves the post, authorless.
    let data = gql_ok(
        &node,
        "mutation($input: DeleteUserInput!) { deleteUser(input: $input) { user { id } errors { code } } }",
        json!({ "input": { "id": ann_id } }),
        Some(&ann_token),
    )
    .await;
    assert_eq!(payload_errors(&data["deleteUser"]), vec![], "{data}");
    let read = gql_ok(
        &node,
        "query($id: ID!, $user: ID!) { post(id: $id) { title author { id } } user(id: $user) { id } }",
        json!({ "id": post_id, "user": ann_id }),
        None,
    )
    .await;
    assert_eq!(
        read,
        json!({ "post": { "title": "Hello again", "author": null }, "user": null })
    );
}

#[tokio::test]
async fn pagination_walks_a_120_post_list_without_gaps_or_repeats() {
    let node = Node::start(&[]);
    let author = create_user(&node, "Prolific").await;
    let other = create_user(&node, "Other").await;

    // 120 posts by the author, in batches of 10 (the default batch limit),
    // with a few by someone else interleaved: the authorId filter must skip them.
    let mut created = Vec::new();
    for batch in 0..12 {
        let requests: Vec<Value> = (0..10)
            .map(|i| {
                json!({
                    "query": "mutation($input: CreatePostInput!) { createPost(input: $input) { post { id } errors { code } } }",
                    "variables": { "input": { "title": format!("post {}", batch * 10 + i), "content": "" } },
                })
            })
            .collect();
        let reply = post_json(&node, &Value::Array(requests), Some(&author.token)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        for result in reply.json().as_array().expect("a batch answer") {
            let id = result["data"]["createPost"]["post"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{result}"));
            created.push(id.to_owned());
        }
        if batch % 4 == 0 {
            create_post(&node, &other.token, "interloper", "").await;
        }
    }
    assert_eq!(created.len(), 120);

    let page_query = "query($after: String, $author: ID) {
        posts(first: 25, after: $after, authorId: $author) {
            totalCount
            pageInfo { hasNextPage startCursor endCursor }
            edges { cursor node { id } }
            nodes { id }
        }
    }";
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let data = gql_ok(
            &node,
            page_query,
            json!({ "after": after, "author": author.id }),
            None,
        )
        .await;
        let page = &data["posts"];
        pages += 1;
        assert!(
            pages <= 5,
            "more than 5 pages of 25 for 120 posts: page {pages}: {page}"
        );
        assert_eq!(
            page["totalCount"], 120,
            "totalCount on page {pages}: {page}"
        );
        let edges = page["edges"].as_array().expect("edges");
        let nodes = page["nodes"].as_array().expect("nodes");
        let expected_len = if pages < 5 { 25 } else { 20 };
        assert_eq!(edges.len(), expected_len, "page {pages} size");
        let edge_ids: Vec<&Value> = edges.iter().map(|e| &e["node"]["id"]).collect();
        let node_ids: Vec<&Value> = nodes.iter().map(|n| &n["id"]).collect();
        assert_eq!(
            edge_ids, node_ids,
            "edges and nodes disagree on page {pages}"
        );
        let info = &page["pageInfo"];
        assert_eq!(
            info["hasNextPage"],
            pages < 5,
            "hasNextPage on page {pages}: {info}"
        );
        assert_eq!(
            info["startCursor"], edges[0]["cursor"],
            "startCursor is the first edge's cursor"
        );
        assert_eq!(
            info["endCursor"],
            edges[edges.len() - 1]["cursor"],
            "endCursor is the last edge's cursor"
        );
        seen.extend(
            edge_ids
                .iter()
                .map(|id| id.as_str().expect("an id").to_owned()),
        );
        if pages == 5 {
            // Past the end: an empty page, still counting the whole list.
            let data = gql_ok(
                &node,
                page_query,
                json!({ "after": info["endCursor"], "author": author.id }),
                None,
            )
            .await;
            assert_eq!(
                data["posts"]["edges"],
                json!([]),
                "after the last cursor: {data}"
            );
            assert_eq!(data["posts"]["pageInfo"]["hasNextPage"], false);
            assert_eq!(data["posts"]["totalCount"], 120);
            break;
        }
        after = Some(info["endCursor"].as_str().expect("endCursor").to_owned());
    }

    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a post was repeated across pages");
    // Newest first, as the schema documents: the exact reverse of creation.
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(
        seen, newest_first,
        "the walk must return every post once, newest first, with no gaps"
    );

    // Unfiltered, the interlopers count too; a bad cursor is refused, not ignored.
    let data = gql_ok(&node, "{ posts(first: 1) { totalCount } }", json!({}), None).await;
    assert_eq!(data["posts"]["totalCount"], 123, "{data}");
    let reply = post_json(
        &node,
        &json!({ "query": "{ posts(first: 5, after: \"garbage\") { totalCount } }" }),
        None,
    )
    .await;
    let response = reply.json();
    assert!(
        !error_messages(&response).is_empty(),
        "an invalid cursor must be an error: {}",
        reply.body
    );
    assert_eq!(
        response["errors"][0]["extensions"]["code"], "VALIDATION_ERROR",
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn comments_notify_the_post_author_and_nobody_else() {
    let node = Node::start(&[]);
    let author = create_user(&node, "Author").await;
    let commenter = create_user(&node, "Commenter").await;
    let bystander = create_user(&node, "Bystander").await;
    let post_id = create_post(&node, &author.token, "Notify me", "").await;

    let data = gql_ok(
        &node,
        "mutation($input: CreateCommentInput!) { createComment(input: $input) { comment { id author { id } post { id } } errors { code } } }",
        json!({ "input": { "postId": post_id, "content": "nice" } }),
        Some(&commenter.token),
    )
    .await;
    assert_eq!(payload_errors(&data["createComment"]), vec![], "{data}");
    assert_eq!(
        data["createComment"]["comment"]["author"]["id"],
        commenter.id.as_str()
    );
    assert_eq!(
        data["createComment"]["comment"]["post"]["id"],
        post_id.as_str()
    );

    let list = "{ notifications(first: 10) { totalCount nodes { id type read payload } } }";
    let mine = gql_ok(&node, list, json!({}), Some(&author.token)).await;
    assert_eq!(
        mine["notifications"]["totalCount"], 1,
        "the post's author is notified: {mine}"
    );
    let notification = mine["notifications"]["nodes"][0].clone();
    assert_eq!(notification["type"], "comment.created", "{notification}");
    assert_eq!(notification["read"], false);
    assert!(
        notification["payload"].to_string().contains(&post_id),
        "the payload names the post: {notification}"
    );
    for other in [&commenter, &bystander] {
        let theirs = gql_ok(&node, list, json!({}), Some(&other.token)).await;
        assert_eq!(
            theirs["notifications"]["totalCount"], 0,
            "only the author is notified: {theirs}"
        );
    }

    // Only the owner may mark it read.
    let mark = "mutation($input: MarkNotificationReadInput!) { markNotificationRead(input: $input) { notification { id read } errors { code } } }";
    let input = json!({ "input": { "id": notification["id"] } });
    let data = gql_ok(&node, mark, input.clone(), Some(&bystander.token)).await;
    assert!(
        data["markNotificationRead"]["notification"].is_null(),
        "{data}"
    );
    assert!(
        !payload_errors(&data["markNotificationRead"]).is_empty(),
        "{data}"
    );
    let data = gql_ok(&node, mark, input, Some(&author.token)).await;
    assert_eq!(
        data["markNotificationRead"]["notification"]["read"], true,
        "{data}"
    );
    let mine = gql_ok(&node, list, json!({}), Some(&author.token)).await;
    assert_eq!(mine["notifications"]["nodes"][0]["read"], true, "{mine}");
}

#[tokio::test]
async fn document_limits_refuse_deep_aliased_and_complex_queries() {
    let node = Node::start(&[]);
    let user = create_user(&node, "Deep").await;
    create_post(&node, &user.token, "one", "").await;

    // Depth 10 runs: posts nodes author posts nodes author posts nodes author id.
    let ten = "{ posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { id } } } } } } } } } }";
    let data = gql_ok(&node, ten, json!({}), None).await;
    let deepest = &data["posts"]["nodes"][0]["author"]["posts"]["nodes"][0]["author"]["posts"]
        ["nodes"][0]["author"]["id"];
    assert_eq!(deepest, user.id.as_str(), "{data}");

    // Depth 11, written out, through a named fragment, and through an inline fragment.
    let elevens = [
        ("plain", "{ posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { posts(first: 1) { totalCount } } } } } } } } } } }".to_owned()),
        ("fragment", "query { posts(first: 1) { nodes { ...Deep } } } fragment Deep on Post { author { posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { posts(first: 1) { totalCount } } } } } } } } }".to_owned()),
        ("nested fragments", "query { posts(first: 1) { ...P } } fragment P on PostConnection { nodes { author { ...U } } } fragment U on User { posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { posts(first: 1) { totalCount } } } } } } } }".to_owned()),
        ("inline fragment", "{ posts(first: 1) { nodes { ... on Post { author { posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { posts(first: 1) { totalCount } } } } } } } } } } } }".to_owned()),
    ];
    for (how, query) in elevens {
        let reply = post_json(&node, &json!({ "query": query }), None).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "depth 11 ({how}) must be refused: {}",
            reply.body
        );
        let response = reply.json();
        let messages = error_messages(&response).to_lowercase();
        assert!(
            messages.contains("deep") || messages.contains("depth"),
            "depth 11 ({how}) needs a clear error: {response}"
        );
        assert!(
            response["data"].is_null(),
            "a refused document must not run ({how}): {response}"
        );
    }

    // Aliases: 30 pass, 31 do not.
    let aliases = |n: usize| {
        format!(
            "{{ {} }}",
            (0..n)
                .map(|i| format!("a{i}: __typename"))
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    let data = gql_ok(&node, &aliases(30), json!({}), None).await;
    assert_eq!(data["a29"], "Query");
    let reply = post_json(&node, &json!({ "query": aliases(31) }), None).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "31 aliases: {}",
        reply.body
    );
    assert!(
        error_messages(&reply.json()).contains("alias"),
        "the refusal must say why: {}",
        reply.body
    );

    // Complexity: 100 users x 100 posts each is far over 1000.
    let reply = post_json(&node, &json!({ "query": "{ users(first: 100) { nodes { posts(first: 100) { nodes { id title } } } } }" }), None).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "a complexity of ~20000: {}",
        reply.body
    );
    assert!(
        error_messages(&reply.json())
            .to_lowercase()
            .contains("complex"),
        "the refusal must say why: {}",
        reply.body
    );

    // A page larger than graphql.max_page_size (100) is refused, not silently cut.
    let reply = post_json(
        &node,
        &json!({ "query": "{ posts(first: 101) { totalCount } }" }),
        None,
    )
    .await;
    assert!(
        !error_messages(&reply.json()).is_empty(),
        "first: 101 over max_page_size 100: {}",
        reply.body
    );
}

#[tokio::test]
async fn introspection_is_off_in_production_and_on_in_development() {
    let introspect = json!({ "query": "{ __schema { queryType { name } } }" });
    let by_type = json!({ "query": "{ __type(name: \"Query\") { name } }" });

    let dev = Node::start(&[]);
    let reply = post_json(&dev, &introspect, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.json()["data"]["__schema"]["queryType"]["name"],
        "Query",
        "development serves introspection"
    );

    let prod = Node::start(&[
        ("SUBGATE__ENVIRONMENT", "production"),
        ("SUBGATE__AUTH__JWT_SECRET", SECRET),
    ]);
    for request in [&introspect, &by_type] {
        let reply = post_json(&prod, request, None).await;
        let response = reply.json();
        let data = &response["data"];
        assert!(
            data.is_null() || (data["__schema"].is_null() && data["__type"].is_null()),
            "production must not answer introspection ({request}): {}",
            reply.body
        );
        assert!(
            !error_messages(&response).is_empty(),
            "production refuses introspection with an error: {}",
            reply.body
        );
    }
    // The schema itself still serves.
    let data = gql_ok(
        &prod,
        "{ __typename users(first: 1) { totalCount } }",
        json!({}),
        None,
    )
    .await;
    assert_eq!(data["users"]["totalCount"], 0, "{data}");
}
