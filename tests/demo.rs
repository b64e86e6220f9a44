//! `fhirwall demo` end to end: the real binary starts its sandbox, and every
//! `curl` it prints is run as printed (its URL, its header, the tokens it
//! exported) and must answer the status it is labelled with.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{bin, free_port};

/// Kills the demo when the test ends, however it ends.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One printed example: the status it promises and its curl line.
struct Example {
    status: u16,
    label: String,
    curl: String,
}

/// Reads the banner up to its closing rule; the rest of stdout (audit
/// records) is drained on a thread so the demo never blocks on it.
fn banner(demo: &mut Demo) -> Vec<String> {
    let stdout = demo.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = Vec::new();
        let mut rules = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.starts_with("=====") {
                rules += 1;
            }
            banner.push(line);
            if rules == 3 {
                break;
            }
        }
        let _ = tx.send(banner);
        for _ in lines {}
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the demo printed no banner within 60 s")
}

/// `export NAME='value'` lines.
fn exports(banner: &[String]) -> Vec<(String, String)> {
    banner
        .iter()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once("='"))
        .map(|(k, v)| (k.to_string(), v.trim_end_matches('\'').to_string()))
        .collect()
}

/// Lines ` NNN — what:` each followed by its `curl` line.
fn examples(banner: &[String]) -> Vec<Example> {
    banner
        .windows(2)
        .filter_map(|w| {
            let (status, label) = w[0].trim().split_once(" — ")?;
            let status = status.parse().ok()?;
            let curl = w[1].trim().strip_prefix("curl ")?.to_string();
            Some(Example {
                status,
                label: label.to_string(),
                curl,
            })
        })
        .collect()
}

/// The URL and optional header of a printed curl line, with the shell's
/// `$VAR` / `${VAR}` replaced by the exported values.
fn parse_curl(curl: &str, vars: &[(String, String)]) -> (String, Option<(String, String)>) {
    let mut expanded = curl.to_string();
    for (k, v) in vars {
        expanded = expanded
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    let rest = expanded.trim_start_matches("-i ").trim();
    let (url, rest) = if let Some(q) = rest.strip_prefix('\'') {
        let (u, r) = q.split_once('\'').unwrap();
        (u.to_string(), r)
    } else {
        let (u, r) = rest.split_once(' ').unwrap_or((rest, ""));
        (u.to_string(), r)
    };
    let header = rest
        .trim()
        .strip_prefix("-H \"")
        .and_then(|h| h.strip_suffix('"'))
        .and_then(|h| h.split_once(": "))
        .map(|(n, v)| (n.to_string(), v.to_string()));
    (url, header)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_printed_example_answers_as_labelled() {
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut demo = Demo(
        Command::new(bin())
            .args(["demo", "--listen", &listen, "--admin", &admin])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("fhirwall demo starts"),
    );
    let banner = banner(&mut demo);
    let text = banner.join("\n");
    assert!(text.contains("SANDBOX"), "{text}");
    assert!(text.contains(&format!("http://{listen}/fhir")), "{text}");

    let vars = exports(&banner);
    let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["PT", "CT"], "{text}");
    let examples = examples(&banner);
    let printed = banner
        .iter()
        .filter(|l| l.trim().starts_with("curl -i"))
        .count();
    assert_eq!(
        examples.len(),
        printed,
        "an example without a status: {text}"
    );
    let statuses: Vec<u16> = examples.iter().map(|e| e.status).collect();
    for wanted in [200, 401, 403] {
        assert!(statuses.contains(&wanted), "no {wanted} example: {text}");
    }

    // The gateway answers once its issuer's keys are loaded.
    let client = reqwest::Client::new();
    let ready = format!("http://{admin}/readyz");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ok = client
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo never got ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for e in &examples {
        let (url, header) = parse_curl(&e.curl, &vars);
        let mut rq = client.get(&url);
        if let Some((name, value)) = &header {
            rq = rq.header(name, value);
        }
        let r = rq.send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(status, e.status, "{} — curl {}: {body}", e.label, e.curl);
    }

    // The printed mint endpoint gives a token the gateway accepts.
    let mint = banner
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("curl '")
                .filter(|l| l.contains("/token?"))
        })
        .expect("a mint example")
        .trim_end_matches('\'');
    let minted: serde_json::Value = client.get(mint).send().await.unwrap().json().await.unwrap();
    let token = minted["access_token"].as_str().expect("access_token");
    let r = client
        .get(format!("http://{listen}/fhir/Patient/p2"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A lifetime beyond a day, or not positive, is refused (an overflowing
    // one panicked the sandbox's task in a debug build).
    for lifetime in ["9223372036854775807", "86401", "0", "-5"] {
        let r = client
            .get(format!("{mint}&lifetime_seconds={lifetime}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "lifetime_seconds={lifetime}");
    }
    let r = client
        .get(format!("{mint}&lifetime_seconds=86400"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
