//! Zero-downtime restart: a second `fhirwall run --upgrade-from <pid>`
//! takes the listening sockets over from a running one, under load, with
//! no request failing; the old one drains and exits, the new one serves.
//! And when no new process is ready (none started, or one that cannot load
//! its keys), the running one is not disturbed. A process started without
//! a takeover is not ready until it holds its port, and one whose listener
//! cannot start stops.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{bin, Gateway, Options, TempDir};

/// Kills the process when dropped (a failed test leaves none behind).
struct Process(std::process::Child);

impl Process {
    /// Sends it `signal` (`TERM`, `HUP`, …).
    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    /// Sends it SIGTERM and asserts it exits cleanly.
    fn terminate(&mut self) {
        self.signal("TERM");
        assert!(self.0.wait().unwrap().success());
    }
}

/// Waits (bounded) until the starting process logging to `log` waits for
/// the running one's sockets.
async fn until_waiting_for_sockets(log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("waiting for the running fhirwall")
    {
        assert!(Instant::now() < deadline, "never waited for sockets");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory only this user can write to, for the upgrade socket.
fn private_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// A gateway whose config names `sock` as its upgrade socket.
async fn with_upgrade_sock(sock: &Path) -> Gateway {
    Gateway::start(Options {
        server_yaml: format!("  upgrade_sock: {}\n", sock.display()),
        ..Options::default()
    })
    .await
}

/// `fhirwall run` with `args` on `config`, its log in `log`.
fn spawn(config: &Path, args: &[&str], log: &PathBuf) -> Process {
    Process(
        Command::new(bin())
            .arg("run")
            .args(args)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .unwrap(),
    )
}

fn log_of(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.dir.join("stderr.log")).unwrap_or_default()
}

/// Clients sending requests across a takeover.
const LOADS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_takes_the_sockets_over_without_a_failed_request() {
    let socks = private_dir("upgrade");
    let mut old = with_upgrade_sock(&socks.0.join("upgrade.sock")).await;
    let token = old.mint("user/*.rs", None);
    assert_eq!(old.get("Patient/p1", Some(&token)).await.status(), 200);

    // Requests all along from a few clients, on kept-alive connections and
    // on new ones (which no client-side retry hides).
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("{}/Patient/p1", old.base);
    let loads: Vec<_> = (0..LOADS)
        .map(|_| {
            let (kept, fresh, url, t) = (
                old.client.clone(),
                fresh.clone(),
                url.clone(),
                token.clone(),
            );
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let until = Instant::now() + Duration::from_secs(9);
                while Instant::now() < until {
                    for (name, client) in [("kept-alive", &kept), ("new", &fresh)] {
                        let r = client.get(&url).bearer_auth(&t).send().await;
                        outcomes.push(
                            r.map(|r| r.status().as_u16())
                                .map_err(|e| format!("{name} connection: {e:?}")),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                outcomes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The new process: same configuration; it signals the old one itself
    // once its keys are loaded.
    let log = socks.0.join("new.log");
    let pid = old.pid().to_string();
    let mut new = spawn(old.config_path(), &["--upgrade-from", &pid], &log);
    let status = old.wait_exit(30).await;
    assert!(status.success(), "the old process ended with {status}");
    let mut outcomes = Vec::new();
    for load in loads {
        outcomes.extend(load.await.unwrap());
    }
    let failed: Vec<_> = outcomes.iter().filter(|o| *o != &Ok(200)).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the takeover: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(outcomes.len() > 200, "{} requests", outcomes.len());

    // Served by the new process alone now; once it stops, nothing answers.
    assert_eq!(old.get("Patient/p1", Some(&token)).await.status(), 200);
    assert!(
        !socks.0.join("upgrade.sock").exists(),
        "the used socket is left"
    );
    new.terminate();
    let new_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        new_log.contains("waiting for the running fhirwall"),
        "{new_log}"
    );
    assert!(
        fresh_get(&old.base, &token).await.is_err(),
        "something still answers"
    );
}

async fn fresh_get(base: &str, token: &str) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::new()
        .get(format!("{base}/Patient/p1"))
        .bearer_auth(token)
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_with_no_new_process_listening_changes_nothing() {
    let socks = private_dir("upgrade-none");
    let mut with_sock = with_upgrade_sock(&socks.0.join("upgrade.sock")).await;
    let mut without = Gateway::start(Options::default()).await;
    // A socket file left by a process that died: nobody listens there.
    drop(std::os::unix::net::UnixListener::bind(socks.0.join("upgrade.sock")).unwrap());
    assert!(socks.0.join("upgrade.sock").exists());
    with_sock.signal("QUIT");
    without.signal("QUIT");
    // The first waits (five seconds) for a new process, then goes on.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for (gw, why) in [
        (&mut with_sock, "no new process waits"),
        (&mut without, "server.upgrade_sock is not set"),
    ] {
        assert!(gw.exited().is_none(), "{why}: the process ended");
        let token = gw.mint("user/*.rs", None);
        assert_eq!(gw.get("Patient/p1", Some(&token)).await.status(), 200);
        assert_eq!(gw.readyz().await, 200, "{why}");
        let log = log_of(gw);
        assert!(
            log.contains("SIGQUIT ignored") && log.contains(why),
            "{why}: {log}"
        );
    }
}

/// Once `old` has logged `why` its SIGQUIT came to nothing: it goes on
/// serving, ready, keeping connections alive (no handover under way).
async fn still_serving_once_logged(old: &mut Gateway, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log_of(old).contains(why) {
        assert!(Instant::now() < deadline, "{}", log_of(old));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(old.exited().is_none(), "the process ended: {}", log_of(old));
    let token = old.mint("user/*.rs", None);
    let r = old.get("Patient/p1", Some(&token)).await;
    assert_eq!(r.status(), 200);
    assert_ne!(
        r.headers().get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    assert_eq!(old.readyz().await, 200);
}

/// A new process seen waiting that is gone when the sockets are sent (it
/// gave up, was killed): the running one goes on serving, rather than
/// stopping with nothing left to take over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_gone_before_the_send_leaves_the_old_one_serving() {
    let socks = private_dir("upgrade-gone");
    let sock = socks.0.join("upgrade.sock");
    let mut old = with_upgrade_sock(&sock).await;
    // Listening under the socket's name (as /proc/net/unix lists it), but
    // the name itself gone: a connect finds nothing.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::fs::remove_file(&sock).unwrap();
    old.signal("QUIT");
    still_serving_once_logged(&mut old, "could not be handed to the new process").await;
    drop(listener);
}

/// One that is still listening but never reads the sockets (killed
/// between its connection's arrival and its next look): sent is not
/// received, and the running one goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_sent_but_never_read_leave_the_old_one_serving() {
    let socks = private_dir("upgrade-unread");
    let sock = socks.0.join("upgrade.sock");
    let mut old = with_upgrade_sock(&sock).await;
    // Listening, never accepting: the connection and the sockets wait in
    // its backlog.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    old.signal("QUIT");
    still_serving_once_logged(&mut old, "did not take the listening sockets").await;
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_cannot_serve_does_not_take_over() {
    let socks = private_dir("upgrade-bad");
    let mut old = with_upgrade_sock(&socks.0.join("upgrade.sock")).await;
    // Its configuration names keys it cannot load.
    let dead = format!("http://127.0.0.1:{}/jwks.json", support::free_port());
    let config = std::fs::read_to_string(old.config_path()).unwrap();
    let jwks_line = config
        .lines()
        .find(|l| l.trim_start().starts_with("jwks_uri:"))
        .unwrap()
        .to_string();
    let bad = socks.0.join("bad.yaml");
    std::fs::write(
        &bad,
        config.replace(&jwks_line, &format!("    jwks_uri: {dead}")),
    )
    .unwrap();
    let log = socks.0.join("new.log");
    let pid = old.pid().to_string();
    let mut new = spawn(&bad, &["--upgrade-from", &pid], &log);
    let status = new.0.wait().unwrap();
    assert!(!status.success());
    let new_log = std::fs::read_to_string(&log).unwrap();
    assert!(new_log.contains("not taking over"), "{new_log}");
    // Not signalled: still serving, still ready.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(old.exited().is_none());
    let token = old.mint("user/*.rs", None);
    assert_eq!(old.get("Patient/p1", Some(&token)).await.status(), 200);
    assert!(!log_of(&old).contains("SIGQUIT"));

    // A SIGHUP (a reload) or SIGQUIT that reaches a starting process
    // (here: one waiting for sockets nobody sends) does not kill it; it
    // gives up by itself.
    let log = socks.0.join("waiting.log");
    let mut waiting = spawn(old.config_path(), &["--upgrade"], &log);
    until_waiting_for_sockets(&log).await;
    for sig in ["HUP", "QUIT"] {
        waiting.signal(sig);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = waiting.0.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), None, "killed by the signal: {status}");
    assert!(old.exited().is_none());

    // And --upgrade needs an upgrade socket in the configuration.
    let no_sock = socks.0.join("no-sock.yaml");
    std::fs::write(
        &no_sock,
        config.replace(
            &format!(
                "  upgrade_sock: {}\n",
                socks.0.join("upgrade.sock").display()
            ),
            "",
        ),
    )
    .unwrap();
    let log = socks.0.join("no-sock.log");
    let status = spawn(&no_sock, &["--upgrade"], &log).0.wait().unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("needs server.upgrade_sock"), "{text}");
}

/// Policies changed while a new process starts (here: while it waits for
/// the sockets) are in force once it serves: the reload they were changed
/// for is not lost to the start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_changed_during_start_up_are_in_force_when_serving() {
    let socks = private_dir("upgrade-rules");
    let rules = socks.0.join("policies");
    std::fs::create_dir_all(&rules).unwrap();
    let file = rules.join("10-rules.yaml");
    std::fs::write(
        &file,
        "rules:\n  - {name: reads-ok, effect: allow, when: {interaction: [read]}}\n",
    )
    .unwrap();
    // Kept ready, switched off by its name.
    let off = rules.join("20-no-deletes.yaml.off");
    std::fs::write(
        &off,
        "rules:\n  - {name: no-deletes, effect: deny, when: {interaction: [delete]}}\n",
    )
    .unwrap();
    let mut old = Gateway::start(Options {
        server_yaml: format!(
            "  upgrade_sock: {}\n",
            socks.0.join("upgrade.sock").display()
        ),
        extra_yaml: format!("policies:\n  dir: {}\n", rules.display()),
        ..Options::default()
    })
    .await;
    let token = old.mint("user/*.cruds", None);
    let log = socks.0.join("new.log");
    let mut new = spawn(old.config_path(), &["--upgrade"], &log);
    until_waiting_for_sockets(&log).await;
    // The operator switches the deny on by its name (a rename keeps the
    // file's old modification time) and reloads: the running process
    // takes it, the starting one has read the files already.
    std::fs::rename(&off, rules.join("20-no-deletes.yaml")).unwrap();
    old.signal("QUIT");
    let status = old.wait_exit(30).await;
    assert!(status.success(), "the old process ended with {status}");
    // Served by the new process: the changed rules hold.
    let mut code = 0;
    for _ in 0..50 {
        let r = old
            .client
            .delete(format!("{}/Observation/startup-rules-1", old.base))
            .bearer_auth(&token)
            .send()
            .await;
        if let Ok(r) = r {
            code = r.status().as_u16();
            if code == 403 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        code,
        403,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(old.upstream.count_containing("startup-rules-1"), 0);
    new.terminate();
    let new_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        new_log.contains("changed while fhirwall started"),
        "{new_log}"
    );
}

/// `config` with its admin listener on a fresh port and, if given, its
/// proxy listener at `listen`; written beside it under `name`.
fn variant(config: &Path, name: &str, listen: Option<&str>) -> PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    let mut out = String::new();
    let mut in_admin = false;
    for line in text.lines() {
        let line = match (line, in_admin) {
            (l, _) if l.starts_with("listen: ") && listen.is_some() => {
                format!("listen: {}", listen.unwrap())
            }
            (l, true) if l.starts_with("  listen: ") => {
                format!("  listen: 127.0.0.1:{}", support::free_port())
            }
            (l, _) => l.to_string(),
        };
        in_admin = line == "admin:" || (in_admin && line.starts_with("  "));
        out.push_str(&line);
        out.push('\n');
    }
    let path = config.with_file_name(name);
    std::fs::write(&path, out).unwrap();
    path
}

/// The admin URL of a config written by [`variant`].
fn admin_of(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let after = text.split("admin:\n  listen: ").nth(1).unwrap();
    format!("http://{}", after.lines().next().unwrap())
}

/// A process started (without a takeover) while another still holds its
/// port is not ready, saying why, until Pingora's retries bind the port
/// once it is free; then it serves. A proxy listener that cannot be bound
/// at all stops the process with exit code 1, instead of leaving its
/// admin listener answering for a proxy nobody can reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_is_ready_only_once_it_holds_its_port() {
    let mut old = Gateway::start(Options::default()).await;
    let token = old.mint("user/*.rs", None);
    let config = variant(old.config_path(), "second.yaml", None);
    let log = old.dir.join("second.log");
    let mut second = spawn(&config, &[], &log);
    let admin = admin_of(&config);
    let client = reqwest::Client::new();
    let readyz = async || match client.get(format!("{admin}/readyz")).send().await {
        Ok(r) => Some((r.status().as_u16(), r.text().await.unwrap())),
        Err(_) => None,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((status, body)) = readyz().await {
            if body.contains("proxy listener") {
                assert_eq!(status, 503, "{body}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "never said why it was not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still not ready while the old process holds the port.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(readyz().await.map(|r| r.0), Some(503));
    assert!(old.terminate().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while readyz().await.map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "not ready once the port was free"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = old.upstream.seen().len();
    let r = client
        .get(format!("{}/Patient/p1", old.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(old.upstream.seen().len(), served + 1);
    second.terminate();

    // An address not on this host (TEST-NET-1): no retries, no serving.
    let port = support::free_port();
    let config = variant(
        old.config_path(),
        "unbindable.yaml",
        Some(&format!("192.0.2.1:{port}")),
    );
    let log = old.dir.join("unbindable.log");
    let mut third = spawn(&config, &[], &log);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = third.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running with no proxy listener"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("listener could not start") && text.contains("192.0.2.1"),
        "{text}"
    );
}

/// `--upgrade-from` takes a process id only: kill(2) reads 0 and negative
/// numbers as process groups, -1 as every process the user may signal.
#[test]
fn upgrade_from_refuses_what_is_not_a_process_id() {
    for pid in ["-1", "0", "-1234"] {
        let (ok, out) = support::run_bin(&[
            "run",
            "--config",
            "config.yaml",
            &format!("--upgrade-from={pid}"),
        ]);
        assert!(!ok, "{pid}: {out}");
        assert!(out.contains("is not in 1.."), "{pid}: {out}");
    }
}

/// DPoP state kept in this process alone while the configuration implies
/// another process serves the same clients (a zero-downtime restart) is
/// said at start: replays across the handover, nonces refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_process_dpop_state_is_warned_of() {
    let socks = private_dir("upgrade-dpop-warn");
    let gw = Gateway::start(Options {
        server_yaml: format!(
            "  upgrade_sock: {}\n",
            socks.0.join("upgrade.sock").display()
        ),
        extra_yaml: "dpop:\n  require_nonce: true\n".into(),
        ..Options::default()
    })
    .await;
    let log = std::fs::read_to_string(gw.dir.join("stderr.log")).unwrap();
    assert!(log.contains("not known to the one taking over"), "{log}");
    assert!(log.contains("each process makes its own nonces"), "{log}");
    // Without an upgrade socket (one process), nothing to say.
    let single = Gateway::start(Options {
        extra_yaml: "dpop:\n  require_nonce: true\n".into(),
        ..Options::default()
    })
    .await;
    let log = std::fs::read_to_string(single.dir.join("stderr.log")).unwrap();
    assert!(
        !log.contains("taking over") && !log.contains("own nonces"),
        "{log}"
    );
}

/// A SIGHUP (a reload sent to every fhirwall) or a SIGQUIT reaching a
/// process still loading its configuration does not end it: here the
/// upstream's name waits on a DNS server that never answers (a socket of
/// the test's, the process's `/etc/resolv.conf` pointing at it in a mount
/// namespace of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_while_the_configuration_loads_do_not_end_the_process() {
    let gw = Gateway::start(Options::default()).await;
    let dir = TempDir::new("slow-dns");
    let dns = std::net::UdpSocket::bind("127.0.0.77:53").expect("a DNS port (tests run as root)");
    dns.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let resolv = dir.0.join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.77\noptions timeout:30 attempts:1\n",
    )
    .unwrap();
    let config = dir.0.join("config.yaml");
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    let url = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("url: "))
        .unwrap()
        .to_string();
    std::fs::write(
        &config,
        text.replace(&url, "http://upstream.fhirwall-slow-dns.test:9/r4"),
    )
    .unwrap();
    let log = dir.0.join("stderr.log");
    let mut child = Process(
        Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
            .arg(format!(
                "set -e; mount --bind {} /etc/resolv.conf; exec \"$0\" \"$@\"",
                resolv.display()
            ))
            .arg(bin())
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    // The lookup has begun: the process is loading its configuration.
    let mut query = [0u8; 512];
    let got = tokio::task::spawn_blocking(move || dns.recv_from(&mut query).map(|_| dns))
        .await
        .unwrap();
    let _dns = got.unwrap_or_else(|e| {
        panic!(
            "no DNS query: {e}; {}",
            std::fs::read_to_string(&log).unwrap()
        )
    });
    child.signal("HUP");
    child.signal("QUIT");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "a signal ended the process: {}",
        std::fs::read_to_string(&log).unwrap()
    );
}
