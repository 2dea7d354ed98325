use super::*;

/// The camelCase GraphQL name of every resolver in `source` that reads the
/// viewer (`viewer(ctx)`, `require_viewer(ctx)`), but those in `skip`.
fn resolvers_reading_the_viewer(source: &str, skip: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in source.match_indices("viewer(ctx)") {
        let before = &source[..at];
        let Some(fn_at) = before.rfind("fn ") else {
            continue;
        };
        let name: String = before[fn_at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if skip.contains(&name.as_str()) {
            continue;
        }
        let mut camel = String::new();
        let mut upper = false;
        for c in name.chars() {
            match (c, upper) {
                ('_', _) => upper = true,
                (c, true) => {
                    camel.extend(c.to_uppercase());
                    upper = false;
                }
                (c, false) => camel.push(c),
            }
        }
        found.push(camel);
    }
    found
}

#[test]
fn every_field_that_reads_the_viewer_is_grouped_per_viewer() {
    // What a subscription's results can reach, and its roots. `open`
    // authorizes with the viewer: each member does that on its own.
    let types = resolvers_reading_the_viewer(include_str!("../types.rs"), &[]);
    let roots = resolvers_reading_the_viewer(include_str!("../subscription.rs"), &["open"]);
    assert!(types.contains(&"email".to_owned()), "{types:?}");
    for field in types.iter().chain(&roots) {
        assert!(
            VIEWER_DEPENDENT_FIELDS.contains(&field.as_str()),
            "{field} reads the viewer: add it to VIEWER_DEPENDENT_FIELDS"
        );
    }
}

fn planned(query: &str, variables: serde_json::Value, viewer: Option<&str>) -> Option<Plan> {
    let mut request = Request::new(query).variables(Variables::from_json(variables));
    let principal = viewer.map(|user_id| Principal {
        user_id: user_id.to_owned(),
        scopes: Vec::new(),
        expires_at: Some(1),
    });
    plan(&mut request, principal.as_ref())
}

#[test]
fn the_key_is_the_tokens_the_operation_the_variables_and_where_it_matters_the_viewer() {
    let key = |q: &str, v: serde_json::Value, who: Option<&str>| planned(q, v, who).map(|p| p.key);
    let feed = key(
        "subscription { postCreated { id } }",
        serde_json::json!({}),
        Some("a"),
    );
    // Spacing and commas are not the document.
    assert_eq!(
        feed,
        key(
            "subscription{postCreated{id,}}",
            serde_json::json!({}),
            Some("b")
        )
    );
    assert_eq!(feed.as_ref().unwrap().viewer, None);
    // Variables are.
    assert_ne!(
        key(
            "subscription($id: ID!) { postUpdated(id: $id) { id } }",
            serde_json::json!({"id": "1"}),
            None
        ),
        key(
            "subscription($id: ID!) { postUpdated(id: $id) { id } }",
            serde_json::json!({"id": "2"}),
            None
        ),
    );
    // A field that depends on the viewer makes the viewer part of it, and
    // the group's own request runs as that viewer, without expiry.
    let own = planned(
        "subscription { postCreated { author { email } } }",
        serde_json::json!({}),
        Some("a"),
    )
    .unwrap();
    assert_eq!(own.key.viewer.as_deref(), Some("a"));
    assert_eq!(
        own.leader
            .as_ref()
            .map(|p| (p.user_id.as_str(), p.expires_at)),
        Some(("a", None))
    );
    assert_ne!(
        Some(own.key),
        key(
            "subscription { postCreated { author { email } } }",
            serde_json::json!({}),
            Some("b")
        )
    );
}

#[test]
fn what_cannot_be_shared_runs_on_its_own() {
    let alone = |q: &str| planned(q, serde_json::json!({}), None).is_none();
    // Resuming replays a history of the member's own.
    assert!(alone(
        "subscription { events(topics: [\"t\"], after: \"1:1\") { id } }"
    ));
    assert!(alone(
        "subscription { messageReceived(channelId: \"c\", after: \"1:1\") { id } }"
    ));
    // Not a subscription, not one plain root field, not a document.
    assert!(alone("{ me { id } }"));
    assert!(alone(
        "subscription { ...F } fragment F on Subscription { postCreated { id } }"
    ));
    assert!(alone("subscription {"));
    assert!(!alone("subscription { events(topics: [\"t\"]) { id } }"));
}

#[test]
fn a_member_resuming_through_a_variable_joins_the_group_without_it() {
    let doc = "subscription($t: [String!]!, $a: String) { events(topics: $t, after: $a) { id } }";
    let resuming = planned(doc, serde_json::json!({"t": ["x"], "a": "1:5"}), None).unwrap();
    assert!(resuming.resumes);
    let live = planned(doc, serde_json::json!({"t": ["x"]}), None).unwrap();
    assert!(!live.resumes);
    assert_eq!(resuming.key, live.key);
    assert!(resuming.variables.get("a").is_none());
    // Over several topics positions cannot say where the replay stands;
    // `after` used elsewhere too would change the group's own request.
    assert!(planned(doc, serde_json::json!({"t": ["x", "y"], "a": "1:5"}), None).is_none());
    let twice =
        "subscription($a: String) { events(topics: [\"x\"], after: $a) { id payload(at: $a) } }";
    assert!(planned(twice, serde_json::json!({"a": "1:5"}), None).is_none());
}
