//! Hybrid search: the HNSW index and the SQLite text index fused by RRF.

use std::sync::Arc;

use arches_core::search::{MetadataFilter, TextIndex, VectorIndex, VectorItem};
use arches_search::{HnswIndex, HnswIndexOptions, HybridSearch, SqliteTextIndex};
use serde_json::json;

use crate::text::{coll, doc, org};

#[tokio::test]
async fn fuses_vector_and_text_rankings() {
    let dir = tempfile::tempdir().unwrap();
    let vectors =
        Arc::new(HnswIndex::open(dir.path().join("vectors"), HnswIndexOptions::default()).unwrap());
    let text = Arc::new(
        SqliteTextIndex::open(&dir.path().join("text.sqlite"))
            .await
            .unwrap(),
    );
    let c = coll("kb");
    let items = [
        ("a", [1.0, 0.0, 0.0], "apples and pears", "fruit"),
        ("b", [0.9, 0.1, 0.0], "bananas", "fruit"),
        ("c", [0.0, 1.0, 0.0], "apples apples apples", "tech"),
        ("d", [0.0, 0.0, 1.0], "nothing relevant", "tech"),
    ];
    vectors
        .upsert(
            org(1),
            &c,
            items
                .iter()
                .map(|(id, v, _, topic)| VectorItem {
                    id: (*id).into(),
                    vector: v.to_vec(),
                    metadata: json!({"topic": topic}).as_object().cloned().unwrap(),
                })
                .collect(),
        )
        .await
        .unwrap();
    text.index(
        org(1),
        &c,
        items
            .iter()
            .map(|(id, _, t, topic)| doc(id, t, json!({"topic": topic})))
            .collect(),
    )
    .await
    .unwrap();
    let hybrid = HybridSearch::new(vectors.clone(), text.clone());
    let all = MetadataFilter::all();
    let hits = hybrid
        .search(org(1), &c, "apples", Some(&[1.0, 0.0, 0.0]), 3, &all)
        .await
        .unwrap();
    // "a" is first in vectors and second in text; "c" first in text only.
    assert_eq!(hits[0].id, "a");
    assert_eq!(hits[0].vector_rank, Some(1));
    assert_eq!(hits[0].text_rank, Some(2));
    let expected = 1.0 / 61.0 + 1.0 / 62.0;
    assert!((hits[0].score - expected).abs() < 1e-12);
    assert!(hits[0].snippet.as_deref().unwrap().contains("«apples»"));
    assert_eq!(hits.len(), 3);
    assert!(hits.iter().any(|h| h.id == "c" && h.text_rank == Some(1)));

    // Text only, and a filter applied to both sides.
    let fruit = MetadataFilter::from_json(&json!({"topic": "fruit"})).unwrap();
    let hits = hybrid
        .search(org(1), &c, "apples", Some(&[0.0, 1.0, 0.0]), 10, &fruit)
        .await
        .unwrap();
    assert!(hits.iter().all(|h| h.metadata["topic"] == json!("fruit")));
    let text_only = hybrid
        .search(org(1), &c, "apples", None, 10, &all)
        .await
        .unwrap();
    assert!(text_only.iter().all(|h| h.vector_rank.is_none()));
    assert_eq!(text_only.len(), 2);
    // A collection with no vectors still answers from text.
    let empty = hybrid
        .search(org(2), &c, "apples", Some(&[1.0, 0.0, 0.0]), 10, &all)
        .await
        .unwrap();
    assert!(empty.is_empty());
}
