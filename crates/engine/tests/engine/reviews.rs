//! Confidence routing and the validation queue, with the scheduler stepped by hand (the test
//! acts as the worker and as the reviewers) on a real SQLite file.

use arches_core::events::DomainEvent;
use arches_core::records::ReviewFilter;
use arches_core::review::{ReviewItem, ReviewKind, ReviewState, Verdict, Vote};
use arches_core::ReviewId;

use super::*;

/// `classify` (an `llm` task, routed with the default policy unless `review` is given), then
/// `use` downstream of it.
fn routed(review: Option<Value>) -> Pipeline {
    let mut classify = json!({"id": "classify", "tool": "llm", "with": {"prompt": "label it"}});
    if let Some(review) = review {
        classify["review"] = review;
    }
    pipeline(json!({
        "name": "routed",
        "tasks": [classify, {"id": "use", "tool": "echo", "depends_on": ["classify"]}]
    }))
}

fn vote(reviewer: &str, verdict: Verdict) -> Vote {
    Vote {
        reviewer: reviewer.into(),
        email: Some(format!("{reviewer}@example.org")),
        verdict,
        edited: None,
        comment: None,
        at: T0,
    }
}

impl Harness {
    /// Sends a vote and steps once; the answer of the step.
    async fn decide(
        &mut self,
        run_id: RunId,
        review_id: ReviewId,
        vote: Vote,
    ) -> (Result<ReviewItem, Error>, StepReport) {
        let (reply, mut answer) = oneshot::channel();
        self.send(Command::Decide {
            run_id,
            review_id,
            vote,
            reply,
        })
        .await;
        let report = self.step().await;
        let answer = answer.try_recv().expect("the step answers the vote");
        (answer, report)
    }

    async fn stored_reviews(&self, run_id: RunId) -> Vec<ReviewItem> {
        self.store
            .review_items(&ReviewFilter {
                run_id: Some(run_id),
                ..Default::default()
            })
            .await
            .expect("the store reads")
    }
}

fn requested(report: &StepReport) -> Vec<ReviewKind> {
    report
        .events
        .iter()
        .filter_map(|e| match e {
            DomainEvent::ReviewRequested { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_result_below_low_waits_without_a_slot_and_an_edited_approval_continues_the_run() {
    let mut h = Harness::with_slots(1).await;
    let p = routed(None);
    let (run_id, report) = h.submit(&p, json!({})).await;
    let classify = assignment(&report, "classify").clone();

    // 0.42 is below the default low (0.7): the task run waits in the queue.
    let report = h
        .complete(&classify, ok(json!({"answer": "cat", "confidence": 0.42})))
        .await;
    assert!(report.assignments.is_empty(), "nothing downstream runs");
    assert_eq!(requested(&report), [ReviewKind::Confidence]);
    assert_eq!(
        h.scheduler.in_flight(),
        0,
        "a waiting result holds no worker slot"
    );
    let stored = h.stored_task(run_id, "classify").await;
    assert_eq!(stored.state, TaskRunState::AwaitingReview);
    assert_eq!(stored.lease_owner, None);
    assert_eq!(
        stored.outputs, None,
        "the proposed result is not applied yet"
    );
    let items = h.stored_reviews(run_id).await;
    assert_eq!(items.len(), 1);
    let item = items[0].clone();
    assert_eq!(
        (item.kind, item.state),
        (ReviewKind::Confidence, ReviewState::Open)
    );
    assert_eq!(item.proposed, json!({"answer": "cat", "confidence": 0.42}));
    assert_eq!(item.confidence, Some(0.42));
    assert_eq!(item.inputs, json!({"prompt": "label it"}));
    assert_eq!(item.thresholds.map(|t| (t.low, t.high)), Some((0.7, 0.9)));
    h.assert_store_matches_memory(run_id).await;

    // Time passes; nothing expires a confidence item.
    h.clock.advance(Duration::from_secs(24 * 3600));
    assert!(h.step().await.is_idle());

    // The reviewer fixes the answer and approves: the edited result is the task's output
    // and `use` runs on it.
    let mut fix = vote("ana", Verdict::Approve);
    fix.edited = Some(json!({"answer": "dog", "confidence": 1.0}));
    let (answer, report) = h.decide(run_id, item.id, fix).await;
    let decided = answer.expect("the vote is applied");
    assert_eq!(decided.state, ReviewState::Approved);
    let used = assignment(&report, "use").clone();
    assert_eq!(
        used.upstream["classify"],
        json!({"answer": "dog", "confidence": 1.0})
    );
    let stored = h.stored_task(run_id, "classify").await;
    assert_eq!(stored.state, TaskRunState::Succeeded);
    assert_eq!(
        stored.outputs,
        Some(json!({"answer": "dog", "confidence": 1.0}))
    );
    let items = h.stored_reviews(run_id).await;
    assert_eq!(items[0].state, ReviewState::Approved);
    assert_eq!(
        items[0].feedback(),
        Some(false),
        "an edit says the model was wrong"
    );
    assert!(report.events.iter().any(|e| matches!(
        e,
        DomainEvent::ReviewDecided {
            state: ReviewState::Approved,
            ..
        }
    )));

    // Exactly one decision wins: a second one is refused and changes nothing.
    let (answer, report) = h.decide(run_id, item.id, vote("bo", Verdict::Reject)).await;
    assert!(
        matches!(answer, Err(Error::Review(_))),
        "a second decision is refused: {answer:?}"
    );
    assert_eq!(report.task_runs_written, 0);
    assert_eq!(
        h.stored_reviews(run_id).await[0].state,
        ReviewState::Approved
    );

    h.complete(&used, ok(json!({}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
}

#[tokio::test]
async fn results_are_routed_by_their_confidence() {
    let mut h = Harness::new().await;
    let p = routed(Some(json!({"audit_rate": 0.0})));

    // At or above high: applied, no item.
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "classify").clone();
    let report = h
        .complete(&a, ok(json!({"answer": "x", "confidence": 0.95})))
        .await;
    assert!(requested(&report).is_empty());
    assert_eq!(
        h.stored_task(run_id, "classify").await.state,
        TaskRunState::Succeeded
    );
    assert!(h.stored_reviews(run_id).await.is_empty());

    // Between low and high: applied, and a notice asks for a look.
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "classify").clone();
    let report = h
        .complete(&a, ok(json!({"answer": "y", "confidence": 0.8})))
        .await;
    assert_eq!(requested(&report), [ReviewKind::Notice]);
    assert_eq!(
        h.stored_task(run_id, "classify").await.state,
        TaskRunState::Succeeded
    );
    assert!(report
        .assignments
        .iter()
        .any(|a| a.task_id.as_str() == "use"));
    let items = h.stored_reviews(run_id).await;
    assert_eq!(
        (items[0].kind, items[0].state),
        (ReviewKind::Notice, ReviewState::Open)
    );

    // No confidence at all (or one outside [0, 1]): the result waits.
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "classify").clone();
    h.complete(&a, ok(json!({"answer": "z", "confidence": 7})))
        .await;
    assert_eq!(
        h.stored_task(run_id, "classify").await.state,
        TaskRunState::AwaitingReview
    );
    assert_eq!(h.stored_reviews(run_id).await[0].confidence, None);

    // A tool that is not an AI tool, without `review`, is never routed.
    let plain = pipeline(json!({"name": "plain", "tasks": [{"id": "t", "tool": "echo"}]}));
    let (run_id, report) = h.submit(&plain, json!({})).await;
    let a = assignment(&report, "t").clone();
    h.complete(&a, ok(json!({"confidence": 0.1}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
}

#[tokio::test]
async fn a_rejection_follows_on_reject() {
    let mut h = Harness::new().await;

    // retry: the task runs again, its tool given the reviewer's comment.
    let p = routed(Some(json!({"on_reject": "retry"})));
    let (run_id, report) = h.submit(&p, json!({})).await;
    let first = assignment(&report, "classify").clone();
    assert_eq!(first.review_comment, None);
    h.complete(&first, ok(json!({"answer": "cat", "confidence": 0.1})))
        .await;
    let item = h.stored_reviews(run_id).await[0].clone();
    let mut no = vote("ana", Verdict::Reject);
    no.comment = Some("it is a dog, look at the ears".into());
    let (answer, report) = h.decide(run_id, item.id, no).await;
    assert_eq!(answer.expect("applied").state, ReviewState::Rejected);
    let second = assignment(&report, "classify");
    assert_eq!(second.attempt, 2);
    assert_eq!(
        second.review_comment.as_deref(),
        Some("it is a dog, look at the ears")
    );
    assert_eq!(
        h.stored_reviews(run_id).await[0].feedback(),
        Some(false),
        "a rejection is feedback"
    );

    // skip: the task and its dependents are skipped, the run still succeeds.
    let p = routed(Some(json!({"on_reject": "skip"})));
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "classify").clone();
    h.complete(&a, ok(json!({"answer": "cat", "confidence": 0.1})))
        .await;
    let item = h.stored_reviews(run_id).await[0].clone();
    h.decide(run_id, item.id, vote("ana", Verdict::Reject))
        .await
        .0
        .expect("applied");
    let states = h.stored_states(run_id).await;
    assert_eq!(states["classify"], TaskRunState::Skipped);
    assert_eq!(
        states["use"],
        TaskRunState::Skipped,
        "a rejected result stops its dependents"
    );
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);

    // fail (the default): the task fails with who rejected it and why.
    let p = routed(None);
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "classify").clone();
    h.complete(&a, ok(json!({"answer": "cat", "confidence": 0.1})))
        .await;
    let item = h.stored_reviews(run_id).await[0].clone();
    let mut no = vote("ana", Verdict::Reject);
    no.comment = Some("wrong".into());
    h.decide(run_id, item.id, no).await.0.expect("applied");
    let stored = h.stored_task(run_id, "classify").await;
    assert_eq!(stored.state, TaskRunState::Failed);
    assert_eq!(
        stored.error.as_deref(),
        Some("rejected by ana@example.org: wrong")
    );
    assert_eq!(h.stored_run(run_id).await.state, RunState::Failed);
}

fn gate(inputs: Value) -> Pipeline {
    pipeline(json!({
        "name": "gated",
        "tasks": [
            {"id": "gate", "tool": "approval", "with": inputs},
            {"id": "ship", "tool": "echo", "depends_on": ["gate"]}
        ]
    }))
}

/// What the `approval` tool returns for `inputs` (the test is the worker).
fn gate_outputs(inputs: &Value) -> Value {
    let request = arches_core::review::ApprovalRequest::from_inputs(inputs).expect("valid inputs");
    serde_json::to_value(request).expect("encodes")
}

#[tokio::test]
async fn an_approval_waits_for_a_quorum_of_its_assignees() {
    let mut h = Harness::new().await;
    let inputs = json!({"message": "ship it?", "assignees": ["ana@example.org", "bo@example.org"], "quorum": 2});
    let (run_id, report) = h.submit(&gate(inputs.clone()), json!({})).await;
    let a = assignment(&report, "gate").clone();
    let report = h.complete(&a, ok(gate_outputs(&inputs))).await;
    assert_eq!(requested(&report), [ReviewKind::Approval]);
    assert_eq!(h.scheduler.in_flight(), 0);
    let item = h.stored_reviews(run_id).await[0].clone();
    assert_eq!(
        (item.quorum, item.message.as_deref()),
        (2, Some("ship it?"))
    );

    // Someone outside the assignees may not vote.
    let (answer, _) = h
        .decide(run_id, item.id, vote("eve", Verdict::Approve))
        .await;
    assert!(matches!(
        answer,
        Err(Error::Review(
            arches_core::execution::ReviewRefusal::NotAssignee { .. }
        ))
    ));
    // One approval of two: still waiting, the vote recorded.
    let (answer, report) = h
        .decide(run_id, item.id, vote("ana", Verdict::Approve))
        .await;
    let after = answer.expect("applied");
    assert_eq!((after.state, after.approvals()), (ReviewState::Open, 1));
    assert!(report.assignments.is_empty());
    assert_eq!(h.stored_reviews(run_id).await[0].votes.len(), 1);
    // The same approver again is refused.
    let (answer, _) = h
        .decide(run_id, item.id, vote("ana", Verdict::Approve))
        .await;
    assert!(matches!(
        answer,
        Err(Error::Review(
            arches_core::execution::ReviewRefusal::AlreadyVoted { .. }
        ))
    ));
    // The second approver completes the quorum: the gate opens.
    let (answer, report) = h
        .decide(run_id, item.id, vote("bo", Verdict::Approve))
        .await;
    assert_eq!(answer.expect("applied").state, ReviewState::Approved);
    assert!(report
        .assignments
        .iter()
        .any(|a| a.task_id.as_str() == "ship"));
    let stored = h.stored_task(run_id, "gate").await;
    assert_eq!(
        stored.outputs,
        Some(json!({
            "approved": true,
            "approvers": ["ana@example.org", "bo@example.org"],
            "comments": [],
            "expired": false
        }))
    );
}

#[tokio::test]
async fn an_approval_expires_with_its_configured_outcome() {
    let mut h = Harness::new().await;
    let inputs = json!({"expires_in": "1h", "on_expiry": "reject"});
    let (run_id, report) = h.submit(&gate(inputs.clone()), json!({})).await;
    let a = assignment(&report, "gate").clone();
    h.complete(&a, ok(gate_outputs(&inputs))).await;
    let item = h.stored_reviews(run_id).await[0].clone();
    assert_eq!(item.expires_at, Some(T0.plus(Duration::from_secs(3600))));

    h.clock.advance(Duration::from_secs(3599));
    assert!(h.step().await.is_idle());
    h.clock.advance(Duration::from_secs(1));
    let report = h.step().await;
    assert_eq!(report.wakeups, 1);
    let stored = h.stored_task(run_id, "gate").await;
    assert_eq!(stored.state, TaskRunState::Failed);
    assert_eq!(
        stored.error.as_deref(),
        Some("the approval expired: the approval expired")
    );
    assert_eq!(
        h.stored_reviews(run_id).await[0].state,
        ReviewState::Expired
    );
    assert_eq!(h.stored_states(run_id).await["ship"], TaskRunState::Skipped);

    // on_expiry approve opens the gate instead.
    let inputs = json!({"expires_in": 60, "on_expiry": "approve"});
    let (run_id, report) = h.submit(&gate(inputs.clone()), json!({})).await;
    let a = assignment(&report, "gate").clone();
    h.complete(&a, ok(gate_outputs(&inputs))).await;
    h.clock.advance(Duration::from_secs(60));
    let report = h.step().await;
    assert!(report
        .assignments
        .iter()
        .any(|a| a.task_id.as_str() == "ship"));
    assert_eq!(
        h.stored_task(run_id, "gate")
            .await
            .outputs
            .expect("outputs")["expired"],
        json!(true)
    );
}

#[tokio::test]
async fn a_waiting_item_survives_a_restart_and_its_decision_continues_the_run() {
    let mut h = Harness::new().await;
    let p = routed(None);
    h.store
        .save_pipeline(OrgId::DEFAULT, &p.def)
        .await
        .expect("the pipeline is stored");
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "classify").clone();
    h.complete(&a, ok(json!({"answer": "cat", "confidence": 0.3})))
        .await;
    let item = h.stored_reviews(run_id).await[0].clone();

    // The process dies; a new one restores the run from the store, with its open item.
    h.restart().await;
    let run = h.stored_run(run_id).await;
    let mut execution = arches_engine::restore_run(h.store.as_ref(), run)
        .await
        .expect("the run restores");
    assert_eq!(
        execution.reclaim_leases(h.now()),
        0,
        "a waiting task holds no lease"
    );
    assert_eq!(execution.open_reviews().len(), 1);
    let (reply, mut answer) = oneshot::channel();
    h.send(Command::Resume {
        execution: Box::new(execution),
        reply,
    })
    .await;
    let report = h.step().await;
    answer.try_recv().expect("answered").expect("resumed");
    assert!(
        report.assignments.is_empty(),
        "the waiting task is not run again"
    );

    let (answer, report) = h
        .decide(run_id, item.id, vote("ana", Verdict::Approve))
        .await;
    assert_eq!(answer.expect("applied").feedback(), Some(true));
    assert!(report
        .assignments
        .iter()
        .any(|a| a.task_id.as_str() == "use"));
    assert_eq!(
        h.stored_task(run_id, "classify").await.outputs,
        Some(json!({"answer": "cat", "confidence": 0.3}))
    );
}

#[tokio::test]
async fn a_cancel_closes_the_waiting_items() {
    let mut h = Harness::new().await;
    let p = routed(None);
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "classify").clone();
    h.complete(&a, ok(json!({"answer": "cat", "confidence": 0.3})))
        .await;
    let (reply, mut answer) = oneshot::channel();
    h.send(Command::Cancel {
        run_id,
        reason: "no longer needed".into(),
        reply,
    })
    .await;
    h.step().await;
    answer.try_recv().expect("answered").expect("cancelled");
    assert_eq!(
        h.stored_task(run_id, "classify").await.state,
        TaskRunState::Cancelled
    );
    assert_eq!(
        h.stored_reviews(run_id).await[0].state,
        ReviewState::Cancelled
    );
    assert_eq!(h.stored_run(run_id).await.state, RunState::Cancelled);
}

#[tokio::test]
async fn decisions_recalibrate_the_thresholds_of_later_results() {
    let mut h = Harness::with_slots(64).await;
    // An under-confident model: its results between 0.5 and 0.7 are right. The reviewers
    // approve 30 of them as proposed (the least feedback a calibration needs); then a
    // result at 0.6 is applied without waiting.
    let p = routed(Some(json!({"audit_rate": 0.0})));
    for i in 0..30 {
        let (run_id, report) = h.submit(&p, json!({})).await;
        let a = assignment(&report, "classify").clone();
        let confidence = 0.5 + 0.006 * f64::from(i);
        h.complete(&a, ok(json!({"answer": "ok", "confidence": confidence})))
            .await;
        let item = h.stored_reviews(run_id).await[0].clone();
        assert_eq!(
            item.kind,
            ReviewKind::Confidence,
            "result {i} waits (fixed low 0.7)"
        );
        h.decide(run_id, item.id, vote("ana", Verdict::Approve))
            .await
            .0
            .expect("applied");
    }
    let (run_id, report) = h.submit(&p, json!({})).await;
    let execution = h.scheduler.execution(run_id).expect("active");
    let thresholds = execution
        .thresholds(&arches_core::TaskId::parse("classify").unwrap())
        .expect("routed");
    assert!(thresholds.calibrated, "{thresholds:?}");
    assert!(thresholds.low <= 0.5 + 1e-9, "{thresholds:?}");
    let a = assignment(&report, "classify").clone();
    let report = h
        .complete(&a, ok(json!({"answer": "ok", "confidence": 0.6})))
        .await;
    assert_eq!(
        requested(&report),
        [ReviewKind::Notice],
        "applied, with a notice"
    );
    assert_eq!(
        h.stored_task(run_id, "classify").await.state,
        TaskRunState::Succeeded
    );
}

/// One bird of `examples/penguins/data/penguins.csv` (the rows with both bill measures).
struct Bird {
    species: String,
    bill: (f64, f64),
}

fn penguins() -> Vec<Bird> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/penguins/data/penguins.csv");
    let text = std::fs::read_to_string(&path).expect("the penguins data set is in the repository");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).expect("a column");
    let (species, length, depth) = (
        column("species"),
        column("bill_length_mm"),
        column("bill_depth_mm"),
    );
    lines
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            Some(Bird {
                species: fields[species].to_owned(),
                bill: (fields[length].parse().ok()?, fields[depth].parse().ok()?),
            })
        })
        .collect()
}

/// A deliberately under-confident classifier: nearest species centroid on the standardised
/// bill length and depth, with a softmax over negative squared distances at temperature 2.
/// About 94 % of its answers are right, but a third of them carry a confidence below 0.7.
fn classify(birds: &[Bird], bird: &Bird) -> (String, f64) {
    let n = birds.len() as f64;
    let mean = |f: fn(&Bird) -> f64| birds.iter().map(f).sum::<f64>() / n;
    let (m0, m1) = (mean(|b| b.bill.0), mean(|b| b.bill.1));
    let sd = |f: fn(&Bird) -> f64, m: f64| {
        (birds.iter().map(|b| (f(b) - m).powi(2)).sum::<f64>() / n).sqrt()
    };
    let (s0, s1) = (sd(|b| b.bill.0, m0), sd(|b| b.bill.1, m1));
    let z = |b: &Bird| ((b.bill.0 - m0) / s0, (b.bill.1 - m1) / s1);
    let mut species: Vec<&str> = birds.iter().map(|b| b.species.as_str()).collect();
    species.sort_unstable();
    species.dedup();
    let scores: Vec<(&str, f64)> = species
        .iter()
        .map(|s| {
            let members: Vec<(f64, f64)> =
                birds.iter().filter(|b| b.species == *s).map(z).collect();
            let k = members.len() as f64;
            let c = (
                members.iter().map(|m| m.0).sum::<f64>() / k,
                members.iter().map(|m| m.1).sum::<f64>() / k,
            );
            let p = z(bird);
            (
                *s,
                (-((p.0 - c.0).powi(2) + (p.1 - c.1).powi(2)) / 2.0).exp(),
            )
        })
        .collect();
    let total: f64 = scores.iter().map(|(_, e)| e).sum();
    let (best, e) = scores
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("three species");
    (best.to_owned(), e / total)
}

/// What a simulation of the queue saw over its second half.
#[derive(Debug)]
struct Outcome {
    queued: usize,
    applied: usize,
    applied_right: usize,
}

/// Routes every bird's answer through the engine, a simulated reviewer deciding every item
/// (approve when the answer is the labelled species, else approve the corrected species),
/// and counts, over the second half, the results that waited and the precision of those
/// applied without waiting.
async fn simulate(calibrate: bool) -> Outcome {
    let birds = penguins();
    let mut h = Harness::with_slots(8).await;
    let p = pipeline(json!({
        "name": "routed",
        "tasks": [{
            "id": "classify", "tool": "llm", "with": {"prompt": "which species?"},
            "review": {"calibrate": calibrate, "audit_rate": 0.2}
        }]
    }));
    let n = birds.len();
    let mut outcome = Outcome {
        queued: 0,
        applied: 0,
        applied_right: 0,
    };
    for k in 0..n {
        // A fixed permutation (the file is sorted by species).
        let bird = &birds[(k * 7919) % n];
        let (answer, confidence) = classify(&birds, bird);
        let right = answer == bird.species;
        let (run_id, report) = h.submit(&p, json!({})).await;
        let a = assignment(&report, "classify").clone();
        h.complete(&a, ok(json!({"species": answer, "confidence": confidence})))
            .await;
        let item = h.stored_reviews(run_id).await.pop();
        let waited = item
            .as_ref()
            .is_some_and(|i| i.kind == ReviewKind::Confidence);
        if k >= n / 2 {
            if waited {
                outcome.queued += 1;
            } else {
                outcome.applied += 1;
                outcome.applied_right += usize::from(right);
            }
        }
        if let Some(item) = item {
            let mut decision = vote("reviewer", Verdict::Approve);
            if !right {
                decision.edited = Some(json!({"species": bird.species, "confidence": 1.0}));
            }
            if item.kind == ReviewKind::Notice {
                // A notice is decided outside the scheduler (its result was applied).
                let mut decided = item.clone();
                decided.state = ReviewState::Approved;
                decided.decided_at = Some(h.now());
                decided.votes.push(decision);
                assert!(h
                    .store
                    .decide_notice(&decided, "reviewer", h.now())
                    .await
                    .expect("stored"));
                h.send(Command::Recalibrate {
                    org_id: OrgId::DEFAULT,
                    pipeline: "routed".into(),
                    task_id: arches_core::TaskId::parse("classify").unwrap(),
                })
                .await;
                h.step().await;
            } else {
                h.decide(run_id, item.id, decision)
                    .await
                    .0
                    .expect("applied");
            }
        }
    }
    outcome
}

#[tokio::test]
async fn calibration_shrinks_the_queue_at_the_target_precision_on_a_labelled_data_set() {
    let fixed = simulate(false).await;
    let calibrated = simulate(true).await;
    let precision = |o: &Outcome| o.applied_right as f64 / o.applied as f64;
    eprintln!(
        "fixed thresholds: {fixed:?} precision {:.3}; calibrated: {calibrated:?} precision {:.3}",
        precision(&fixed),
        precision(&calibrated)
    );
    // The fixed policy queues a third of the answers, most of them right.
    assert!(fixed.queued >= 40, "{fixed:?}");
    // Calibration learns that answers above about 0.5 are right 95 % of the time: the
    // queue shrinks by more than half …
    assert!(
        calibrated.queued * 2 <= fixed.queued,
        "calibrated {calibrated:?} vs fixed {fixed:?}"
    );
    // … while the results applied without review still meet the target precision (0.95).
    assert!(precision(&calibrated) >= 0.95, "{calibrated:?}");
}
