//! Criterion benches for the hot pieces of the request path:
//! classification, the scope decision, and token validation with and
//! without the verified-token cache.
//!
//!     cargo bench --bench hot

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use fhirwall::config::Issuer;
use fhirwall::decide::decide;
use fhirwall::fhir::classify::{classify, classify_bundle, HttpRequest};
use fhirwall::sandbox::keys::{jwks, KeyKind, SigningKey};
use fhirwall::scope::ScopeSet;
use fhirwall::token::cache::TokenCache;
use fhirwall::token::{inspect, token_hash, verify, KeySet};
use jsonwebtoken::Algorithm;
use serde_json::json;

const NOW: i64 = 1_800_000_000;

fn issuer() -> Issuer {
    Issuer {
        name: "bench".into(),
        issuer: "https://idp.example".into(),
        jwks_uri: None,
        discovery: true,
        audiences: vec!["https://fhir.example/fhir".into()],
        algorithms: vec![Algorithm::RS256, Algorithm::ES256],
        leeway_seconds: 30,
        require_at_jwt_typ: false,
        require_binding: false,
        require_binding_for_clients: Vec::new(),
        introspection: None,
    }
}

fn claims() -> serde_json::Value {
    json!({"iss": "https://idp.example", "aud": "https://fhir.example/fhir", "sub": "u", "client_id": "c",
           "scope": "openid fhirUser launch/patient patient/*.rs user/Observation.rs user/Condition.cruds",
           "patient": "p1", "exp": NOW + 600, "iat": NOW})
}

fn bench_classify(c: &mut Criterion) {
    c.bench_function("classify/search-type", |b| {
        b.iter(|| {
            classify(black_box(HttpRequest {
                method: "GET",
                path: "Observation",
                query: Some("patient=p1&code=http%3A%2F%2Floinc.org%7C8867-4&_count=50"),
                if_none_exist: None,
            }))
            .unwrap()
        })
    });
    c.bench_function("classify/read", |b| {
        b.iter(|| {
            classify(black_box(HttpRequest {
                method: "GET",
                path: "Patient/p1",
                query: None,
                if_none_exist: None,
            }))
            .unwrap()
        })
    });
    let entries: Vec<_> = (0..10)
        .map(|i| json!({"request": {"method": "GET", "url": format!("Observation/o{i}")}}))
        .collect();
    let body =
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}).to_string();
    let base = classify(HttpRequest {
        method: "POST",
        path: "",
        query: None,
        if_none_exist: None,
    })
    .unwrap();
    c.bench_function("classify/transaction-10-entries", |b| {
        b.iter(|| classify_bundle(base.clone(), black_box(body.as_bytes())).unwrap())
    });
}

fn bench_decide(c: &mut Criterion) {
    let scopes = ScopeSet::parse(claims()["scope"].as_str().unwrap());
    let read = classify(HttpRequest {
        method: "GET",
        path: "Observation/o1",
        query: None,
        if_none_exist: None,
    })
    .unwrap();
    let comp = classify(HttpRequest {
        method: "GET",
        path: "Patient/p1/Condition",
        query: Some("_count=10"),
        if_none_exist: None,
    })
    .unwrap();
    c.bench_function("decide/user-read", |b| {
        b.iter(|| decide(black_box(&read), &scopes, Some("p1")).unwrap())
    });
    c.bench_function("decide/patient-compartment", |b| {
        b.iter(|| decide(black_box(&comp), &scopes, Some("p1")).unwrap())
    });
    c.bench_function("scope/parse", |b| {
        b.iter(|| ScopeSet::parse(black_box(claims()["scope"].as_str().unwrap())))
    });
}

fn bench_tokens(c: &mut Criterion) {
    let iss = issuer();
    for (kind, name) in [(KeyKind::P256, "ES256"), (KeyKind::Rsa2048, "RS256")] {
        let key = SigningKey::generate(kind, "k1");
        let keys: KeySet = KeySet::from_jwks(&jwks(&[&key])).unwrap().0;
        let token = key.sign(&claims());
        c.bench_function(&format!("token/uncached-verify-{name}"), |b| {
            b.iter(|| {
                let u = inspect(black_box(&token), 16 * 1024).unwrap();
                verify(&token, &u, &iss, &keys, NOW).unwrap()
            })
        });
        let cache = TokenCache::new(100_000, Duration::from_secs(300));
        let u = inspect(&token, 16 * 1024).unwrap();
        cache.insert(
            token_hash(&token),
            Arc::new(verify(&token, &u, &iss, &keys, NOW).unwrap()),
            Arc::new(keys.clone()),
            u.kid.as_deref(),
            NOW,
        );
        c.bench_function(&format!("token/cached-{name}"), |b| {
            b.iter(|| cache.get(&token_hash(black_box(&token)), NOW).unwrap())
        });
    }
}

criterion_group!(benches, bench_classify, bench_decide, bench_tokens);
criterion_main!(benches);
