use super::*;
use crate::config::{Audit, AuditSink};

fn metrics() -> AuditMetrics {
    crate::metrics::Metrics::new(&[]).audit
}

#[test]
fn hex_encodes_every_byte() {
    assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    assert_eq!(hex(&[]), "");
}

#[test]
fn flush_writes_every_queued_record_in_order() {
    let path =
        std::env::temp_dir().join(format!("fhirwall-audit-test-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let cfg = Audit {
        sink: AuditSink::File(path.clone()),
        ..Audit::stdout()
    };
    let log = AuditLog::open(&cfg, event::Site::default(), metrics()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for i in 0..1000 {
        let id = format!("r{i}");
        let r = Record {
            request_id: &id,
            decision: "allow",
            ..Record::default()
        };
        rt.block_on(log.record(&r));
    }
    log.flush().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1000);
    assert!(ids.iter().enumerate().all(|(i, id)| *id == format!("r{i}")));
}

#[test]
fn scrub_keeps_names_and_drops_values() {
    assert_eq!(
        scrub("parameter 'name=M%FCller' is not valid UTF-8"),
        "parameter 'name=<redacted>' is not valid UTF-8"
    );
    assert_eq!(
        scrub("entry 2: Patient?name=Smith&birthdate=1970-01-01 is not allowed"),
        "entry 2: Patient?name=<redacted>&birthdate=<redacted> is not allowed"
    );
    assert_eq!(
        scrub("_format=xml is refused"),
        "_format=<redacted> is refused"
    );
    assert_eq!(scrub("a = b, x="), "a = b, x=");
    // A list of values goes whole.
    assert_eq!(
        scrub("'Patient?name=Smith,Jones&_elements=id,name' refused"),
        "'Patient?name=<redacted>&_elements=<redacted>' refused"
    );
    // Long details are cut, at a character boundary, and say so.
    let long = format!("'{}' is not below the FHIR base", "é".repeat(2000));
    let kept = scrub(&long);
    assert!(
        kept.len() <= 1024 + '…'.len_utf8() + 4 && kept.ends_with('…'),
        "{}",
        kept.len()
    );
}

#[test]
fn a_writer_stuck_on_one_batch_makes_the_log_unready() {
    let log = AuditLog::open(&Audit::stdout(), event::Site::default(), metrics()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !log.ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "stdout sink never ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Busy on a batch for less than the deadline: still ready.
    let busy = &log.shared.busy_since_ms;
    busy.store(epoch_ms() - 1_000, Ordering::Release);
    assert!(log.ready());
    // Longer than a request would wait for its decision record: not ready.
    busy.store(epoch_ms() - 6_000, Ordering::Release);
    assert!(!log.ready());
    busy.store(0, Ordering::Release);
    assert!(log.ready());
}

/// A log whose queue holds two records, in front of a FHIR endpoint that
/// takes the connection and never answers: the writer hangs on it (its
/// first probe), so nothing leaves the queue.
fn behind_a_hung_endpoint(on_failure: crate::config::OnAuditFailure) -> AuditLog {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/fhir", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(4).collect();
        std::thread::sleep(std::time::Duration::from_secs(60));
        drop(held);
    });
    let cfg = Audit {
        sink: AuditSink::Fhir {
            endpoint: endpoint.parse().unwrap(),
            timeout: std::time::Duration::from_secs(30),
            batch_max: 10,
            bearer_token: None,
        },
        format: crate::config::AuditFormat::AuditEvent,
        queue_capacity: 2,
        on_failure,
        ..Audit::stdout()
    };
    AuditLog::open(&cfg, event::Site::default(), metrics()).unwrap()
}

#[test]
fn a_full_queue_sends_request_records_to_the_spill_file() {
    let spill = std::env::temp_dir().join(format!(
        "fhirwall-audit-spill-test-{}.jsonl",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&spill);
    let log = behind_a_hung_endpoint(crate::config::OnAuditFailure::Spill(spill.clone()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for i in 0..3 {
        let id = format!("r{i}");
        let r = Record {
            id: id.clone(),
            request_id: &id,
            decision: "allow",
            ..Record::default()
        };
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), log.record(&r))
                .await
                .expect("a full queue with a spill file does not wait")
        });
    }
    assert_eq!(log.queue_depth(), 2, "two queued, behind the hung writer");
    let spilled = std::fs::read_to_string(&spill).unwrap_or_default();
    let _ = std::fs::remove_file(&spill);
    assert_eq!(spilled.lines().count(), 1, "{spilled}");
    assert!(spilled.contains("\"r2\""), "{spilled}");
}

/// A request record waiting for room in a full queue (no spill file) whose
/// wait is dropped (shutdown ends the request's task) is counted as lost
/// and logged, never gone unsaid.
#[test]
fn a_record_whose_wait_for_room_is_dropped_is_counted_lost() {
    let log = behind_a_hung_endpoint(crate::config::OnAuditFailure::Refuse);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for i in 0..3 {
        let id = format!("r{i}");
        let r = Record {
            id: id.clone(),
            request_id: &id,
            decision: "allow",
            ..Record::default()
        };
        let waited = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(300), log.record(&r)).await
        });
        // Two fit; the third waits for room, and its wait is dropped.
        assert_eq!(waited.is_err(), i == 2, "r{i}");
    }
    assert_eq!(log.queue_depth(), 2);
    assert_eq!(log.lost_count(), 1, "the third record counted lost");
}
