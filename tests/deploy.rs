//! `deploy/` and `docs/` name only metrics fhirwall exports, and the
//! Kubernetes example's configuration and policies pass `fhirwall check`.

mod support;

use std::collections::BTreeSet;

use support::{Gateway, Options, TempDir};

/// `fhirwall_…` identifiers in a text, with histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("fhirwall_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        let name = name.trim_end_matches('_');
        // The bare prefix, as prose mentions it.
        if name != "fhirwall" {
            names.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_and_docs_name_only_exported_metrics() {
    // With `redis:` (and nothing there, `on_failure: local` keeps it
    // ready), so that the Redis metrics are exported too.
    let gw = Gateway::start(Options {
        extra_yaml: format!(
            "redis:\n  url: redis://127.0.0.1:{}/0\n  on_failure: local\n",
            support::free_port()
        ),
        ..Options::default()
    })
    .await;
    let exported: BTreeSet<String> = gw
        .metrics()
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert!(exported.len() > 20);
    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts_test.yml",
        "deploy/grafana/fhirwall-dashboard.json",
        "docs/metrics.md",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file} names no metric");
        let unknown: Vec<_> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics fhirwall does not export: {unknown:?}"
        );
    }
    // And the reference documents every exported metric.
    let doc = metric_names(&std::fs::read_to_string(format!("{root}/docs/metrics.md")).unwrap());
    let undocumented: Vec<_> = exported.iter().filter(|n| !doc.contains(*n)).collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/metrics.md: {undocumented:?}"
    );
}

#[test]
fn the_kubernetes_example_passes_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/deploy/kubernetes/configmap.yaml")).unwrap();
    let dir = TempDir::new("k8s");
    std::fs::create_dir_all(dir.0.join("policies")).unwrap();
    // The two ConfigMaps' data, as files, read with the project's YAML crate.
    #[derive(serde::Deserialize)]
    struct ConfigMap {
        data: std::collections::BTreeMap<String, String>,
    }
    let maps: Vec<ConfigMap> = serde_saphyr::from_multiple(&text).unwrap();
    let files: Vec<(String, String)> = maps.into_iter().flat_map(|m| m.data).collect();
    assert!(files.iter().any(|(k, _)| k == "config.yaml"));
    assert!(files.len() >= 2, "no policy files found");
    for (key, body) in files {
        let path = if key == "config.yaml" {
            dir.0.join(key)
        } else {
            dir.0.join("policies").join(key)
        };
        // In-cluster names and paths, made local.
        let body = body
            .replace("http://legacy-fhir:8080", "http://127.0.0.1:8080")
            .replace("/var/log/fhirwall/", &format!("{}/", dir.0.display()));
        std::fs::write(path, body).unwrap();
    }
    let (ok, out) = support::check(&dir.0.join("config.yaml"));
    assert!(ok, "{out}");
}
