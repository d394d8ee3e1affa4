//! The cost layer: a seed's monthly object-storage bill from a dated price table.
//!
//! Owns: the price table (`data/prices.toml`), tiered storage and egress arithmetic, and the
//! usage a run implies (packed storage, requests, egress scaled to a 30-day month).
//! Must not: guess prices — every number comes from the data file, which carries its date and
//! sources. Volumes are in GiB, as AWS bills them ("GB" on its price list is 2^30 bytes).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::scenario::PRICES_TOML;
use crate::Error;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Seconds in the 30-day month bills are scaled to.
pub const MONTH_S: f64 = 30.0 * 86400.0;

/// Provider keys the price table must have; every bill lists them (sorted by key, as a map).
pub const PROVIDERS: [&str; 5] = [
    "aws_s3_standard",
    "aws_s3_ia",
    "cloudflare_r2",
    "backblaze_b2",
    "hetzner",
];

/// A storage volume tier.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageTier {
    /// Upper bound of the tier, GiB.
    pub upto_gb: f64,
    /// Price per GiB-month within the tier.
    pub per_gb_month: f64,
}

/// An egress volume tier.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EgressTier {
    /// Upper bound of the tier, GiB per month.
    pub upto_gb: f64,
    /// Price per GiB within the tier.
    pub per_gb: f64,
}

/// One provider's prices.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// Where the numbers come from.
    pub source: String,
    /// `USD` (default) or `EUR`.
    #[serde(default)]
    pub currency: Option<String>,
    /// Storage tiers.
    pub storage_tiers: Vec<StorageTier>,
    /// Class A requests per 1,000.
    pub put_per_1k: f64,
    /// Class B requests per 1,000.
    pub get_per_1k: f64,
    /// Retrieval fee per GiB read.
    pub retrieval_per_gb: f64,
    /// Egress tiers.
    pub egress_tiers: Vec<EgressTier>,
    /// Egress free up to this multiple of stored volume.
    pub free_egress_x_stored: f64,
    /// Egress included per month, GiB.
    pub free_egress_gb: f64,
}

/// The whole table.
#[derive(Clone, Debug)]
pub struct Prices {
    /// Date of the table.
    pub as_of: String,
    /// EUR → USD.
    pub eur_usd: f64,
    /// Providers by key.
    pub providers: BTreeMap<String, Provider>,
}

impl Prices {
    /// The table compiled into the binary.
    pub fn builtin() -> Result<Prices, Error> {
        let mut t: toml::Table = toml::from_str(PRICES_TOML).map_err(|e| Error::Data {
            file: "data/prices.toml".into(),
            msg: e.to_string(),
        })?;
        let bad = |msg: &str| Error::Data {
            file: "data/prices.toml".into(),
            msg: msg.into(),
        };
        let as_of = t
            .remove("as_of")
            .and_then(|v| v.as_str().map(str::to_string))
            .ok_or_else(|| bad("as_of missing"))?;
        let eur_usd = t
            .remove("eur_usd")
            .and_then(|v| v.as_float())
            .ok_or_else(|| bad("eur_usd missing"))?;
        let mut providers = BTreeMap::new();
        for (k, v) in t {
            let p: Provider = v.try_into().map_err(|e: toml::de::Error| Error::Data {
                file: "data/prices.toml".into(),
                msg: format!("{k}: {e}"),
            })?;
            providers.insert(k, p);
        }
        for p in PROVIDERS {
            if !providers.contains_key(p) {
                return Err(bad(&format!("provider {p} missing")));
            }
        }
        Ok(Prices {
            as_of,
            eur_usd,
            providers,
        })
    }
}

/// What a seed uses in one month.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Usage {
    /// Bytes stored (average over the month).
    pub stored_bytes: f64,
    /// Write requests (one per pack).
    pub puts: f64,
    /// Read requests (one ranged read per NAR-sized run served).
    pub gets: f64,
    /// Bytes sent out.
    pub egress_bytes: f64,
}

/// Sums a tiered marginal price over `volume`; `tiers` are (upper bound, price), ascending.
fn tiered(volume: f64, tiers: impl IntoIterator<Item = (f64, f64)>) -> f64 {
    let mut cost = 0.0;
    let mut lower = 0.0;
    for (upto, price) in tiers {
        if volume <= lower {
            break;
        }
        let in_tier = volume.min(upto) - lower;
        cost += in_tier.max(0.0) * price;
        lower = upto;
    }
    cost
}

/// One provider's monthly bill in USD.
pub fn provider_bill(p: &Provider, eur_usd: f64, u: &Usage) -> f64 {
    let stored = u.stored_bytes / GIB;
    let egress = u.egress_bytes / GIB;
    let storage = tiered(
        stored,
        p.storage_tiers.iter().map(|t| (t.upto_gb, t.per_gb_month)),
    );
    let free = p.free_egress_gb + p.free_egress_x_stored * stored;
    let billable = (egress - free).max(0.0);
    let egress_cost = tiered(
        billable,
        p.egress_tiers.iter().map(|t| (t.upto_gb, t.per_gb)),
    );
    let requests = u.puts / 1000.0 * p.put_per_1k + u.gets / 1000.0 * p.get_per_1k;
    let retrieval = egress * p.retrieval_per_gb;
    let total = storage + egress_cost + requests + retrieval;
    if p.currency.as_deref() == Some("EUR") {
        total * eur_usd
    } else {
        total
    }
}

/// The bill for every provider in `PROVIDERS`, rounded to cents, keyed by provider.
pub fn bills(prices: &Prices, u: &Usage) -> BTreeMap<String, f64> {
    PROVIDERS
        .iter()
        .filter_map(|k| {
            prices.providers.get(*k).map(|p| {
                (
                    (*k).to_string(),
                    (provider_bill(p, prices.eur_usd, u) * 100.0).round() / 100.0,
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIB: f64 = 1024.0 * GIB;

    #[test]
    fn reproduces_cache_nixos_org_2023_bill_within_20_percent() {
        // 2023: 107 TiB Standard + 318 TiB Standard-IA, 29.5 TiB filled to the CDN in April,
        // about $9,000/month (discourse.nixos.org t/28107 post 16, t/28672).
        let prices = Prices::builtin().unwrap();
        let std = &prices.providers["aws_s3_standard"];
        let ia = &prices.providers["aws_s3_ia"];
        let standard = provider_bill(
            std,
            prices.eur_usd,
            &Usage {
                stored_bytes: 107.0 * TIB,
                egress_bytes: 29.5 * TIB,
                ..Usage::default()
            },
        );
        let infrequent = provider_bill(
            ia,
            prices.eur_usd,
            &Usage {
                stored_bytes: 318.0 * TIB,
                ..Usage::default()
            },
        );
        let total = standard + infrequent;
        assert!((total - 9000.0).abs() / 9000.0 < 0.20, "{total}");
        // Storage alone is the notes' $6.5k self-test.
        let storage_only = total
            - provider_bill(
                std,
                prices.eur_usd,
                &Usage {
                    egress_bytes: 29.5 * TIB,
                    ..Usage::default()
                },
            );
        assert!((storage_only - 6530.0).abs() < 50.0, "{storage_only}");
    }

    #[test]
    fn packs_make_requests_negligible() {
        // 600 TB in 64 MiB packs ≈ 9 M PUTs ≈ $45 at S3 prices (notes/simulation.md).
        let prices = Prices::builtin().unwrap();
        let puts = 600e12 / (64.0 * 1024.0 * 1024.0);
        let b = provider_bill(
            &prices.providers["aws_s3_standard"],
            1.0,
            &Usage {
                puts,
                ..Usage::default()
            },
        );
        assert!((b - 44.7).abs() < 1.0, "{b}");
    }

    #[test]
    fn b2_egress_free_up_to_three_times_stored() {
        let prices = Prices::builtin().unwrap();
        let p = &prices.providers["backblaze_b2"];
        let u = |egress| Usage {
            stored_bytes: 10.0 * TIB,
            egress_bytes: egress,
            ..Usage::default()
        };
        let storage = provider_bill(p, 1.0, &u(0.0));
        assert_eq!(provider_bill(p, 1.0, &u(30.0 * TIB)), storage);
        assert!(provider_bill(p, 1.0, &u(31.0 * TIB)) > storage);
    }
}
