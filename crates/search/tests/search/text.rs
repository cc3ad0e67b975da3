//! The text-index conformance suite: every check runs against SQLite FTS5 and against
//! PostgreSQL (see `pg.rs`).

use arches_core::search::{
    CollectionName, MetadataFilter, SearchError, TextDocument, TextIndex, MAX_BATCH,
    MAX_QUERY_BYTES, MAX_TEXT_BYTES,
};
use arches_core::OrgId;
use serde_json::json;
use uuid::Uuid;

pub fn org(n: u128) -> OrgId {
    OrgId(Uuid::from_u128(n))
}

pub fn coll(name: &str) -> CollectionName {
    CollectionName::new(name).unwrap()
}

pub fn doc(id: &str, text: &str, metadata: serde_json::Value) -> TextDocument {
    TextDocument {
        id: id.to_owned(),
        text: text.to_owned(),
        metadata: metadata.as_object().cloned().unwrap_or_default(),
    }
}

fn ids(hits: &[arches_core::search::TextHit]) -> Vec<&str> {
    hits.iter().map(|h| h.id.as_str()).collect()
}

pub async fn corpus(index: &dyn TextIndex, o: OrgId, c: &CollectionName) {
    let docs = vec![
        doc(
            "volcano",
            "Volcanoes erupt when magma rises. Magma chambers feed volcanic eruptions.",
            json!({"lang": "en", "topic": "geology", "year": 2020}),
        ),
        doc(
            "magma",
            "Magma magma magma: molten rock beneath the crust is called magma.",
            json!({"lang": "en", "topic": "geology", "year": 2021}),
        ),
        doc(
            "bread",
            "Bakers knead dough and bake bread in hot ovens.",
            json!({"lang": "en", "topic": "food", "year": 2020}),
        ),
        doc(
            "pain",
            "Le boulanger cuit le pain dans un four chaud.",
            json!({"lang": "fr", "topic": "food", "year": 2019}),
        ),
        doc(
            "ovens",
            "Industrial ovens reach high temperatures, like magma.",
            json!({"lang": "en", "topic": "industry", "year": 2022, "flag": true}),
        ),
    ];
    assert_eq!(index.index(o, c, docs).await.unwrap(), 5);
}

pub async fn ranks_matches_by_relevance(index: &dyn TextIndex) {
    let c = coll("kb");
    corpus(index, org(1), &c).await;
    let hits = index
        .search(org(1), &c, "magma", 10, &MetadataFilter::all())
        .await
        .unwrap();
    assert_eq!(ids(&hits)[0], "magma", "{hits:?}");
    let mut found = ids(&hits);
    found.sort_unstable();
    assert_eq!(found, ["magma", "ovens", "volcano"]);
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(hits.iter().all(|h| h.score > 0.0));
    // Words are ANDed; stemming matches "ovens" with "oven".
    let hits = index
        .search(org(1), &c, "bake oven", 10, &MetadataFilter::all())
        .await
        .unwrap();
    assert_eq!(ids(&hits), ["bread"]);
    // k bounds the hits.
    let hits = index
        .search(org(1), &c, "magma", 1, &MetadataFilter::all())
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].metadata["topic"], json!("geology"));
}

pub async fn snippets_mark_the_matches(index: &dyn TextIndex) {
    let c = coll("kb");
    corpus(index, org(1), &c).await;
    let hits = index
        .search(org(1), &c, "bread", 10, &MetadataFilter::all())
        .await
        .unwrap();
    let snippet = hits[0].snippet.as_deref().unwrap();
    assert!(snippet.contains("«bread»"), "{snippet}");
}

pub async fn phrases_or_and_exclusion_work(index: &dyn TextIndex) {
    let c = coll("kb");
    corpus(index, org(1), &c).await;
    let all = MetadataFilter::all();
    let hits = index
        .search(org(1), &c, "\"molten rock\"", 10, &all)
        .await
        .unwrap();
    assert_eq!(ids(&hits), ["magma"]);
    let hits = index
        .search(org(1), &c, "\"rock molten\"", 10, &all)
        .await
        .unwrap();
    assert!(hits.is_empty());
    let mut hits = ids(&index
        .search(org(1), &c, "bread or volcanoes", 10, &all)
        .await
        .unwrap())
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    hits.sort();
    assert_eq!(hits, ["bread", "volcano"]);
    let hits = index
        .search(org(1), &c, "magma -volcanoes -ovens", 10, &all)
        .await
        .unwrap();
    assert_eq!(ids(&hits), ["magma"]);
}

pub async fn orgs_and_collections_are_isolated(index: &dyn TextIndex) {
    let c = coll("kb");
    corpus(index, org(1), &c).await;
    let all = MetadataFilter::all();
    index
        .index(
            org(2),
            &c,
            vec![doc("x", "magma in another org", json!({}))],
        )
        .await
        .unwrap();
    let hits = index.search(org(2), &c, "magma", 10, &all).await.unwrap();
    assert_eq!(ids(&hits), ["x"]);
    assert!(index
        .search(org(3), &c, "magma", 10, &all)
        .await
        .unwrap()
        .is_empty());
    assert!(index
        .search(org(1), &coll("other"), "magma", 10, &all)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(index.count(org(1), &c).await.unwrap(), 5);
    assert_eq!(index.count(org(2), &c).await.unwrap(), 1);
    assert_eq!(index.count(org(3), &c).await.unwrap(), 0);
    // Deleting in one org leaves the other's document of the same id.
    index
        .index(org(2), &c, vec![doc("magma", "magma twin", json!({}))])
        .await
        .unwrap();
    assert_eq!(
        index.delete(org(2), &c, &["magma".into()]).await.unwrap(),
        1
    );
    let hits = index.search(org(1), &c, "molten", 10, &all).await.unwrap();
    assert_eq!(ids(&hits), ["magma"]);
}

async fn filtered(
    index: &dyn TextIndex,
    c: &CollectionName,
    filter: serde_json::Value,
) -> Vec<String> {
    let filter = MetadataFilter::from_json(&filter).unwrap();
    let hits = index.search(org(1), c, "magma", 10, &filter).await.unwrap();
    let mut found: Vec<String> = hits.into_iter().map(|h| h.id).collect();
    found.sort();
    found
}

pub async fn metadata_filters_apply(index: &dyn TextIndex) {
    let c = coll("kb");
    corpus(index, org(1), &c).await;
    assert_eq!(
        filtered(index, &c, json!({"topic": "geology"})).await,
        ["magma", "volcano"]
    );
    assert_eq!(
        filtered(index, &c, json!({"topic": ["industry", "food"]})).await,
        ["ovens"]
    );
    assert_eq!(filtered(index, &c, json!({"year": 2021})).await, ["magma"]);
    assert_eq!(
        filtered(index, &c, json!({"year": 2021.0})).await,
        ["magma"]
    );
    assert_eq!(
        filtered(index, &c, json!({"year": [2020, 2022]})).await,
        ["ovens", "volcano"]
    );
    assert!(filtered(index, &c, json!({"year": "2021"}))
        .await
        .is_empty());
    assert_eq!(filtered(index, &c, json!({"flag": true})).await, ["ovens"]);
    assert!(filtered(index, &c, json!({"flag": false})).await.is_empty());
    assert!(filtered(index, &c, json!({"missing": "x"}))
        .await
        .is_empty());
    assert_eq!(
        filtered(index, &c, json!({"topic": "geology", "year": [2020, 2019]})).await,
        ["volcano"]
    );
}

pub async fn reindexing_replaces_and_deleting_removes(index: &dyn TextIndex) {
    let c = coll("kb");
    corpus(index, org(1), &c).await;
    let all = MetadataFilter::all();
    index
        .index(
            org(1),
            &c,
            vec![
                doc("bread", "first version about glaciers", json!({"v": 1})),
                // Repeated id: the last wins.
                doc("bread", "Glaciers carve valleys slowly.", json!({"v": 2})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(index.count(org(1), &c).await.unwrap(), 5);
    assert!(index
        .search(org(1), &c, "dough", 10, &all)
        .await
        .unwrap()
        .is_empty());
    assert!(index
        .search(org(1), &c, "first", 10, &all)
        .await
        .unwrap()
        .is_empty());
    let hits = index
        .search(org(1), &c, "glaciers", 10, &all)
        .await
        .unwrap();
    assert_eq!(ids(&hits), ["bread"]);
    assert_eq!(hits[0].metadata["v"], json!(2));
    let deleted = index
        .delete(org(1), &c, &["bread".into(), "unknown".into()])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert!(index
        .search(org(1), &c, "glaciers", 10, &all)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(index.count(org(1), &c).await.unwrap(), 4);
    assert!(index.drop_collection(org(1), &c).await.unwrap());
    assert_eq!(index.count(org(1), &c).await.unwrap(), 0);
    assert!(index
        .search(org(1), &c, "magma", 10, &all)
        .await
        .unwrap()
        .is_empty());
    assert!(!index.drop_collection(org(1), &c).await.unwrap());
}

pub async fn query_syntax_from_users_never_errors(index: &dyn TextIndex) {
    let c = coll("kb");
    corpus(index, org(1), &c).await;
    let all = MetadataFilter::all();
    for query in [
        "\"",
        "\"\"",
        "magma\"",
        "*",
        "magma*",
        "(magma",
        "magma)",
        "NOT",
        "AND OR NOT",
        "magma AND",
        "OR magma",
        "col:magma",
        "^magma",
        "NEAR(magma rock)",
        "'; DROP TABLE documents; --",
        "\\",
        "-",
        "--magma",
        "magma & | ! <-> :*",
        "{}[]",
        "\u{0}",
        "🌋 magma",
        "   ",
        "",
    ] {
        let result = index.search(org(1), &c, query, 10, &all).await;
        assert!(result.is_ok(), "query {query:?}: {result:?}");
    }
    let hits = index.search(org(1), &c, "(magma)", 10, &all).await.unwrap();
    assert_eq!(hits.len(), 3);
    assert!(index
        .search(org(1), &c, "", 10, &all)
        .await
        .unwrap()
        .is_empty());
    assert!(index
        .search(org(1), &c, "?!.,", 10, &all)
        .await
        .unwrap()
        .is_empty());
}

pub async fn bad_input_is_refused(index: &dyn TextIndex) {
    let c = coll("kb");
    let all = MetadataFilter::all();
    let error = index
        .index(
            org(1),
            &c,
            vec![doc("big", &"a ".repeat(MAX_TEXT_BYTES / 2 + 1), json!({}))],
        )
        .await
        .unwrap_err();
    assert!(matches!(error, SearchError::TextTooLarge { .. }), "{error}");
    let error = index
        .index(org(1), &c, vec![doc("", "text", json!({}))])
        .await
        .unwrap_err();
    assert!(matches!(error, SearchError::InvalidId { .. }));
    let many = (0..=MAX_BATCH)
        .map(|i| doc(&i.to_string(), "t", json!({})))
        .collect();
    let error = index.index(org(1), &c, many).await.unwrap_err();
    assert!(matches!(error, SearchError::TooManyItems { .. }));
    for k in [0, 1001] {
        let error = index
            .search(org(1), &c, "magma", k, &all)
            .await
            .unwrap_err();
        assert!(matches!(error, SearchError::InvalidK { .. }));
    }
    let long = "magma ".repeat(MAX_QUERY_BYTES / 6 + 1);
    let error = index.search(org(1), &c, &long, 10, &all).await.unwrap_err();
    assert!(matches!(error, SearchError::InvalidQuery(_)));
    assert_eq!(index.count(org(1), &c).await.unwrap(), 0);
    // NUL characters are stored as spaces rather than refused.
    index
        .index(org(1), &c, vec![doc("nul", "alpha\0omega", json!({}))])
        .await
        .unwrap();
    let hits = index.search(org(1), &c, "omega", 10, &all).await.unwrap();
    assert_eq!(ids(&hits), ["nul"]);
}

/// One `#[tokio::test]` per check, on a fresh index from `$fixture` (an expression giving
/// a value whose `.index()` is a `&dyn TextIndex`, kept alive for the test).
#[macro_export]
macro_rules! text_conformance {
    ($fixture:expr) => {
        $crate::text_conformance!(@tests $fixture;
            ranks_matches_by_relevance,
            snippets_mark_the_matches,
            phrases_or_and_exclusion_work,
            orgs_and_collections_are_isolated,
            metadata_filters_apply,
            reindexing_replaces_and_deleting_removes,
            query_syntax_from_users_never_errors,
            bad_input_is_refused,
        );
    };
    (@tests $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let fixture = $fixture;
                $crate::text::$name(fixture.index()).await;
            }
        )*
    };
}

mod sqlite {
    use arches_core::search::TextIndex;
    use arches_search::SqliteTextIndex;

    pub struct Fixture {
        index: SqliteTextIndex,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        pub fn index(&self) -> &dyn TextIndex {
            &self.index
        }
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let index = SqliteTextIndex::open(&dir.path().join("text.sqlite"))
            .await
            .unwrap();
        Fixture { index, _dir: dir }
    }

    crate::text_conformance!(fixture().await);

    #[tokio::test]
    async fn documents_survive_reopening_the_file() {
        use super::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("text.sqlite");
        {
            let index = SqliteTextIndex::open(&path).await.unwrap();
            corpus(&index, org(1), &coll("kb")).await;
        }
        let index = SqliteTextIndex::open(&path).await.unwrap();
        let hits = index
            .search(
                org(1),
                &coll("kb"),
                "magma",
                10,
                &arches_core::search::MetadataFilter::all(),
            )
            .await
            .unwrap();
        assert_eq!(hits.len(), 3);
        let memory = SqliteTextIndex::in_memory().await.unwrap();
        corpus(&memory, org(1), &coll("kb")).await;
        assert_eq!(memory.count(org(1), &coll("kb")).await.unwrap(), 5);
    }
}
