//! Zero-downtime restart: a second `fhirwall run --upgrade` takes the
//! listening sockets over from a running one (SIGQUIT), under load, with
//! no request failing; the old one drains and exits, the new one serves.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{bin, Gateway, Options, TempDir};

/// Kills the process when dropped (a failed test leaves none behind).
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_takes_the_sockets_over_without_a_failed_request() {
    let socks = TempDir::new("upgrade");
    let sock = socks.0.join("upgrade.sock");
    let mut old = Gateway::start(Options {
        server_yaml: format!("  upgrade_sock: {}\n", sock.display()),
        ..Options::default()
    })
    .await;
    let token = old.mint("user/*.rs", None);
    assert_eq!(old.get("Patient/p1", Some(&token)).await.status(), 200);

    // The new process: same configuration, waiting for the sockets.
    let log = socks.0.join("new.log");
    let new = Process(
        Command::new(bin())
            .args(["run", "--upgrade", "--config"])
            .arg(old.config_path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("waiting for the running fhirwall's sockets")
    {
        assert!(
            Instant::now() < deadline,
            "the new process never got ready to take over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Requests all along: keep-alive connections and new ones.
    let (client, url, t) = (
        old.client.clone(),
        format!("{}/Patient/p1", old.base),
        token.clone(),
    );
    let load = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        let until = Instant::now() + Duration::from_secs(9);
        while Instant::now() < until {
            let r = client.get(&url).bearer_auth(&t).send().await;
            outcomes.push(r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        outcomes
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    old.signal("QUIT");
    let status = old.wait_exit(20).await;
    assert!(status.success(), "the old process ended with {status}");
    let outcomes = load.await.unwrap();
    let failed: Vec<_> = outcomes.iter().filter(|o| *o != &Ok(200)).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the takeover: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(outcomes.len() > 100, "{} requests", outcomes.len());

    // Served by the new process alone now; once it stops, nothing answers.
    assert_eq!(old.get("Patient/p1", Some(&token)).await.status(), 200);
    let new_log = std::fs::read_to_string(&log).unwrap();
    assert!(new_log.contains("fhirwall starting"), "{new_log}");
    let mut new = new;
    let ok = Command::new("kill")
        .args(["-TERM", &new.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert!(new.0.wait().unwrap().success());
    assert!(
        old.client
            .get(format!("{}/Patient/p1", old.base))
            .bearer_auth(&token)
            .send()
            .await
            .is_err(),
        "something still answers"
    );
}
