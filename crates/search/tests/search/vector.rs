//! The HNSW vector index: search, tenancy, validation, filters, deletions, persistence.

use std::collections::HashSet;
use std::path::Path;

use arches_core::search::{
    CollectionName, MetadataFilter, SearchError, VectorIndex, VectorItem, MAX_BATCH,
    MAX_METADATA_BYTES,
};
use arches_core::OrgId;
use arches_search::bench;
use arches_search::vector::{dot, normalized};
use arches_search::{HnswIndex, HnswIndexOptions};
use serde_json::json;
use uuid::Uuid;

fn org(n: u128) -> OrgId {
    OrgId(Uuid::from_u128(n))
}

fn coll(name: &str) -> CollectionName {
    CollectionName::new(name).unwrap()
}

fn item(id: &str, vector: Vec<f32>, metadata: serde_json::Value) -> VectorItem {
    VectorItem {
        id: id.to_owned(),
        vector,
        metadata: metadata.as_object().cloned().unwrap_or_default(),
    }
}

fn open(dir: &Path) -> HnswIndex {
    HnswIndex::open(dir, HnswIndexOptions::default()).unwrap()
}

/// `n` clustered vectors of dimension `dim` with metadata `{"group": i % 100, "half": i % 2,
/// "twentieth": i % 20 == 0}`.
fn clustered_items(n: usize, dim: usize) -> Vec<VectorItem> {
    let data = bench::clustered(n, dim, 20, 7, 8);
    (0..n)
        .map(|i| {
            item(
                &format!("v{i}"),
                data.row(i).to_vec(),
                json!({"group": i % 100, "half": (i % 2).to_string(), "twentieth": i % 20 == 0}),
            )
        })
        .collect()
}

/// Exact top k among `items` that `filter` matches (ids), for comparison.
fn exact(items: &[VectorItem], query: &[f32], k: usize, filter: &MetadataFilter) -> Vec<String> {
    let q = normalized(query);
    let mut scored: Vec<(f32, &str)> = items
        .iter()
        .filter(|it| filter.matches(&it.metadata))
        .map(|it| (dot(&q, &normalized(&it.vector)), it.id.as_str()))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    scored
        .into_iter()
        .take(k)
        .map(|(_, id)| id.to_owned())
        .collect()
}

async fn upsert_all(index: &HnswIndex, o: OrgId, c: &CollectionName, items: &[VectorItem]) {
    for chunk in items.chunks(2000) {
        index.upsert(o, c, chunk.to_vec()).await.unwrap();
    }
}

#[tokio::test]
async fn finds_the_most_similar_items_with_cosine_scores() {
    let dir = tempfile::tempdir().unwrap();
    let index = open(dir.path());
    let c = coll("docs");
    let items = vec![
        item("east", vec![1.0, 0.0, 0.0], json!({"n": 1})),
        item("north", vec![0.0, 2.0, 0.0], json!({})),
        item("west", vec![-3.0, 0.0, 0.0], json!({})),
        item("north-east", vec![1.0, 1.0, 0.0], json!({})),
    ];
    assert_eq!(index.upsert(org(1), &c, items).await.unwrap(), 4);
    let hits = index
        .search(org(1), &c, &[10.0, 0.0, 0.0], 4, &MetadataFilter::all())
        .await
        .unwrap();
    let ids: Vec<&str> = hits.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, ["east", "north-east", "north", "west"]);
    assert!((hits[0].score - 1.0).abs() < 1e-6);
    assert!((hits[1].score - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    assert!(hits[2].score.abs() < 1e-6);
    assert!((hits[3].score + 1.0).abs() < 1e-6);
    assert_eq!(hits[0].metadata["n"], json!(1));
    assert_eq!(index.count(org(1), &c).await.unwrap(), 4);
}

#[tokio::test]
async fn orgs_and_collections_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let index = open(dir.path());
    let c = coll("shared-name");
    index
        .upsert(org(1), &c, vec![item("a", vec![1.0, 0.0], json!({}))])
        .await
        .unwrap();
    index
        .upsert(org(2), &c, vec![item("b", vec![1.0, 0.1], json!({}))])
        .await
        .unwrap();
    let hits = index
        .search(org(2), &c, &[1.0, 0.0], 10, &MetadataFilter::all())
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].id, "b");
    assert_eq!(index.count(org(1), &c).await.unwrap(), 1);
    let missing = index
        .search(org(3), &c, &[1.0, 0.0], 10, &MetadataFilter::all())
        .await
        .unwrap_err();
    assert!(matches!(missing, SearchError::CollectionNotFound { .. }));
    let other = index.count(org(1), &coll("other")).await.unwrap_err();
    assert!(matches!(other, SearchError::CollectionNotFound { .. }));
    // Separate directories per org.
    assert_ne!(
        index.collection_dir(org(1), &c),
        index.collection_dir(org(2), &c)
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_its_cause_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let index = open(dir.path());
    let c = coll("docs");
    index
        .upsert(org(1), &c, vec![item("a", vec![1.0, 0.0, 0.0], json!({}))])
        .await
        .unwrap();

    let error = index
        .upsert(
            org(1),
            &c,
            vec![
                item("b", vec![1.0, 0.0, 0.0], json!({})),
                item("c", vec![1.0, 0.0], json!({})),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(
        error,
        SearchError::DimensionMismatch {
            expected: 3,
            got: 2,
            id: Some("c".into())
        }
    );
    let message = error.to_string();
    assert!(
        message.contains("dimension 3") && message.contains("got 2"),
        "{message}"
    );

    let error = index
        .search(org(1), &c, &[1.0, 0.0], 1, &MetadataFilter::all())
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        SearchError::DimensionMismatch {
            expected: 3,
            got: 2,
            id: None
        }
    ));

    let nan = index
        .upsert(
            org(1),
            &c,
            vec![item("d", vec![f32::NAN, 0.0, 0.0], json!({}))],
        )
        .await
        .unwrap_err();
    assert!(matches!(nan, SearchError::VectorNotFinite { .. }));
    let zero = index
        .upsert(org(1), &c, vec![item("d", vec![0.0; 3], json!({}))])
        .await
        .unwrap_err();
    assert!(matches!(zero, SearchError::VectorNotFinite { .. }));

    let big = json!({"text": "x".repeat(MAX_METADATA_BYTES)});
    let error = index
        .upsert(org(1), &c, vec![item("e", vec![1.0, 0.0, 0.0], big)])
        .await
        .unwrap_err();
    assert!(matches!(error, SearchError::MetadataTooLarge { .. }));

    let many: Vec<VectorItem> = (0..=MAX_BATCH)
        .map(|i| item(&i.to_string(), vec![1.0, 0.0, 0.0], json!({})))
        .collect();
    let error = index.upsert(org(1), &c, many).await.unwrap_err();
    assert!(
        matches!(error, SearchError::TooManyItems { got, max } if got == MAX_BATCH + 1 && max == MAX_BATCH)
    );

    let error = index
        .upsert(org(1), &c, vec![item("", vec![1.0, 0.0, 0.0], json!({}))])
        .await
        .unwrap_err();
    assert!(matches!(error, SearchError::InvalidId { .. }));

    for k in [0, 1001] {
        let error = index
            .search(org(1), &c, &[1.0, 0.0, 0.0], k, &MetadataFilter::all())
            .await
            .unwrap_err();
        assert!(matches!(error, SearchError::InvalidK { .. }));
    }
    // Nothing of the refused batches was written.
    assert_eq!(index.count(org(1), &c).await.unwrap(), 1);
}

#[tokio::test]
async fn upserts_replace_and_deletes_remove() {
    let dir = tempfile::tempdir().unwrap();
    let index = open(dir.path());
    let c = coll("docs");
    index
        .upsert(
            org(1),
            &c,
            vec![
                item("a", vec![1.0, 0.0], json!({"v": 1})),
                item("b", vec![0.0, 1.0], json!({})),
                // Repeated id in one batch: the last wins.
                item("a", vec![1.0, 0.05], json!({"v": 2})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(index.count(org(1), &c).await.unwrap(), 2);
    index
        .upsert(
            org(1),
            &c,
            vec![item("a", vec![0.0, -1.0], json!({"v": 3}))],
        )
        .await
        .unwrap();
    let hits = index
        .search(org(1), &c, &[0.0, -1.0], 1, &MetadataFilter::all())
        .await
        .unwrap();
    assert_eq!(hits[0].id, "a");
    assert_eq!(hits[0].metadata["v"], json!(3));
    assert_eq!(index.count(org(1), &c).await.unwrap(), 2);
    let deleted = index
        .delete(org(1), &c, &["a".into(), "nope".into()])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let hits = index
        .search(org(1), &c, &[0.0, -1.0], 10, &MetadataFilter::all())
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].id, "b");
}

#[tokio::test]
async fn graph_search_has_high_recall_on_clustered_data() {
    let dir = tempfile::tempdir().unwrap();
    let index = open(dir.path());
    let c = coll("big");
    let items = clustered_items(6000, 32);
    upsert_all(&index, org(1), &c, &items).await;
    let queries = bench::clustered(50, 32, 20, 7, 99);
    let mut found = 0;
    for i in 0..queries.len() {
        let q = queries.row(i);
        let want: HashSet<String> = exact(&items, q, 10, &MetadataFilter::all())
            .into_iter()
            .collect();
        let hits = index
            .search(org(1), &c, q, 10, &MetadataFilter::all())
            .await
            .unwrap();
        assert_eq!(hits.len(), 10);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        found += hits.iter().filter(|h| want.contains(&h.id)).count();
    }
    let recall = found as f64 / (queries.len() * 10) as f64;
    assert!(recall >= 0.9, "recall@10 {recall}");
}

#[tokio::test]
async fn filtered_search_returns_k_matching_items_when_they_exist() {
    let dir = tempfile::tempdir().unwrap();
    let index = open(dir.path());
    let c = coll("filtered");
    let items = clustered_items(6000, 16);
    upsert_all(&index, org(1), &c, &items).await;
    let queries = bench::clustered(10, 16, 20, 7, 123);
    let filters = [
        // 50%: graph search with the filter hook.
        MetadataFilter::from_json(&json!({"half": "1"})).unwrap(),
        // 5%: graph search, widened if short.
        MetadataFilter::from_json(&json!({"twentieth": true})).unwrap(),
        // 1% (60 items): exact scan.
        MetadataFilter::from_json(&json!({"group": 42})).unwrap(),
        // Two conditions, `in` and equality (3% of items).
        MetadataFilter::from_json(&json!({"group": [1, 2, 3, 4, 5, 6], "half": "0"})).unwrap(),
    ];
    for filter in &filters {
        let matching = items
            .iter()
            .filter(|it| filter.matches(&it.metadata))
            .count();
        assert!(matching >= 50);
        let mut found = 0;
        for i in 0..queries.len() {
            let q = queries.row(i);
            let hits = index.search(org(1), &c, q, 50, filter).await.unwrap();
            assert_eq!(hits.len(), 50, "filter {filter:?}");
            assert!(hits.iter().all(|h| filter.matches(&h.metadata)));
            let want: HashSet<String> = exact(&items, q, 50, filter).into_iter().collect();
            found += hits.iter().filter(|h| want.contains(&h.id)).count();
        }
        let recall = found as f64 / (queries.len() * 50) as f64;
        assert!(recall >= 0.9, "filter {filter:?}: recall {recall}");
    }
    // Fewer matching items than k: all of them.
    let rare = MetadataFilter::from_json(&json!({"group": 7, "half": "1"})).unwrap();
    let matching = items.iter().filter(|it| rare.matches(&it.metadata)).count();
    let hits = index
        .search(org(1), &c, queries.row(0), 1000, &rare)
        .await
        .unwrap();
    assert_eq!(hits.len(), matching);
    let none = MetadataFilter::from_json(&json!({"group": "42"})).unwrap();
    assert!(index
        .search(org(1), &c, queries.row(0), 10, &none)
        .await
        .unwrap()
        .is_empty());
}

async fn results(
    index: &HnswIndex,
    c: &CollectionName,
    queries: &bench::Dataset,
) -> Vec<Vec<(String, f32)>> {
    let mut all = Vec::new();
    for i in 0..queries.len() {
        let hits = index
            .search(org(1), c, queries.row(i), 10, &MetadataFilter::all())
            .await
            .unwrap();
        all.push(hits.into_iter().map(|h| (h.id, h.score)).collect());
    }
    all
}

#[tokio::test]
async fn reopening_gives_the_same_results_from_the_log_and_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let c = coll("persist");
    let items = clustered_items(4000, 24);
    let queries = bench::clustered(20, 24, 20, 7, 5);
    let deleted: Vec<String> = (0..40).map(|i| format!("v{}", i * 7)).collect();
    let before = {
        let index = open(dir.path());
        upsert_all(&index, org(1), &c, &items).await;
        index.delete(org(1), &c, &deleted).await.unwrap();
        results(&index, &c, &queries).await
    };
    // Reopened from the first (empty) snapshot and the log.
    let index = open(dir.path());
    assert_eq!(index.count(org(1), &c).await.unwrap(), 4000 - 40);
    let replayed = results(&index, &c, &queries).await;
    assert_eq!(replayed.len(), before.len());
    // The log replays the same inserts, so the same items come back; the graph may differ
    // (parallel inserts), so compare against exact results rather than order only.
    for (i, hits) in replayed.iter().enumerate() {
        let got: HashSet<&str> = hits.iter().map(|(id, _)| id.as_str()).collect();
        assert!(deleted.iter().all(|d| !got.contains(d.as_str())));
        let was: HashSet<&str> = before[i].iter().map(|(id, _)| id.as_str()).collect();
        assert!(got.intersection(&was).count() >= 9, "query {i}");
    }
    // A snapshot, then reopen: exactly the same results (same graph).
    index.checkpoint_all().await.unwrap();
    let snapshotted = results(&index, &c, &queries).await;
    drop(index);
    let index = open(dir.path());
    assert_eq!(results(&index, &c, &queries).await, snapshotted);
    assert_eq!(index.count(org(1), &c).await.unwrap(), 4000 - 40);
}

#[tokio::test]
async fn a_torn_log_record_is_cut_off_and_a_damaged_snapshot_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let c = coll("torn");
    {
        let index = open(dir.path());
        index
            .upsert(org(1), &c, vec![item("a", vec![1.0, 0.0], json!({}))])
            .await
            .unwrap();
    }
    let cdir = open(dir.path()).collection_dir(org(1), &c);
    let wal = cdir.join("wal-1.log");
    let mut bytes = std::fs::read(&wal).unwrap();
    let good = bytes.len();
    // Half a record: a length, a checksum and a few bytes.
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9]);
    std::fs::write(&wal, &bytes).unwrap();
    {
        let index = open(dir.path());
        assert_eq!(index.count(org(1), &c).await.unwrap(), 1);
        assert_eq!(std::fs::metadata(&wal).unwrap().len() as usize, good);
        index
            .upsert(org(1), &c, vec![item("b", vec![0.0, 1.0], json!({}))])
            .await
            .unwrap();
    }
    let index = open(dir.path());
    assert_eq!(index.count(org(1), &c).await.unwrap(), 2);
    index.checkpoint_all().await.unwrap();
    drop(index);
    let items = cdir.join("snap-2").join("items.bin");
    let mut bytes = std::fs::read(&items).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&items, &bytes).unwrap();
    let error = open(dir.path()).count(org(1), &c).await.unwrap_err();
    assert!(matches!(error, SearchError::Corrupt { .. }), "{error}");
}

#[tokio::test]
async fn many_deletions_compact_the_graph_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = coll("compact");
    let items = clustered_items(3000, 16);
    let gone: Vec<String> = (0..1200).map(|i| format!("v{i}")).collect();
    {
        let index = open(dir.path());
        upsert_all(&index, org(1), &c, &items).await;
        index.delete(org(1), &c, &gone).await.unwrap();
        assert_eq!(index.count(org(1), &c).await.unwrap(), 1800);
        // Compaction wrote a new snapshot: the first generation's files are gone.
        let cdir = index.collection_dir(org(1), &c);
        assert!(!cdir.join("snap-1").exists());
        assert!(cdir.join("snap-2").join("items.bin").exists());
    }
    let index = open(dir.path());
    assert_eq!(index.count(org(1), &c).await.unwrap(), 1800);
    let live = &items[1200..];
    let queries = bench::clustered(10, 16, 20, 7, 77);
    for i in 0..queries.len() {
        let hits = index
            .search(org(1), &c, queries.row(i), 10, &MetadataFilter::all())
            .await
            .unwrap();
        assert_eq!(hits.len(), 10);
        let want: HashSet<String> = exact(live, queries.row(i), 10, &MetadataFilter::all())
            .into_iter()
            .collect();
        assert!(hits.iter().filter(|h| want.contains(&h.id)).count() >= 9);
    }
}

#[tokio::test]
async fn dropping_a_collection_removes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let index = open(dir.path());
    let c = coll("gone");
    index
        .upsert(org(1), &c, vec![item("a", vec![1.0], json!({}))])
        .await
        .unwrap();
    let cdir = index.collection_dir(org(1), &c);
    assert!(cdir.exists());
    assert!(index.disk_usage(org(1), &c) > 0);
    assert!(index.drop_collection(org(1), &c).await.unwrap());
    assert!(!cdir.exists());
    assert!(!index.drop_collection(org(1), &c).await.unwrap());
    assert!(matches!(
        index.count(org(1), &c).await.unwrap_err(),
        SearchError::CollectionNotFound { .. }
    ));
    // A new collection of that name starts afresh, with another dimension.
    index
        .upsert(org(1), &c, vec![item("b", vec![1.0, 2.0], json!({}))])
        .await
        .unwrap();
    assert_eq!(index.count(org(1), &c).await.unwrap(), 1);
}
