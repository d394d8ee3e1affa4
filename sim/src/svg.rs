//! Minimal SVG line charts.
//!
//! Owns: turning a few numeric series into a self-contained SVG (axes, ticks, polylines, legend).
//! Written here rather than pulled from a plotting crate: it is ~150 lines, builds in no time on
//! the 2-core machine, needs no font library (text is left to the viewer), and prints numbers
//! with fixed precision so the same run gives byte-identical files.
//! Must not: compute anything about the simulation.

use std::fmt::Write;

/// One named series of (x, y) points.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points, in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// Chart options.
pub struct Chart<'a> {
    /// Title.
    pub title: &'a str,
    /// X axis label.
    pub x_label: &'a str,
    /// Y axis label.
    pub y_label: &'a str,
    /// Logarithmic x axis (base 10).
    pub log_x: bool,
    /// Force the y range to start at 0.
    pub y_from_zero: bool,
}

const W: f64 = 720.0;
const H: f64 = 420.0;
const L: f64 = 80.0;
const R: f64 = 180.0;
const T: f64 = 40.0;
const B: f64 = 60.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn nice_step(span: f64) -> f64 {
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    step * mag
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e6 || v.abs() < 1e-3 {
        format!("{v:.1e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Renders a chart. Points that are not finite (or ≤ 0 on a log axis) are skipped.
pub fn line_chart(c: &Chart, series: &[Series]) -> String {
    let tx = |x: f64| if c.log_x { x.log10() } else { x };
    let ok = |x: f64, y: f64| x.is_finite() && y.is_finite() && (!c.log_x || x > 0.0);
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|&&(x, y)| ok(x, y));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(tx(x));
        x1 = x1.max(tx(x));
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if c.y_from_zero {
        y0 = y0.min(0.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let pw = W - L - R;
    let ph = H - T - B;
    let px = |x: f64| L + (tx(x) - x0) / (x1 - x0) * pw;
    let py = |y: f64| T + ph - (y - y0) / (y1 - y0) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        L + pw / 2.0,
        esc(c.title)
    );
    // Axes.
    let _ = writeln!(
        s,
        r#"<path d="M{L:.1} {T:.1} V{:.1} H{:.1}" fill="none" stroke="black"/>"#,
        T + ph,
        L + pw
    );
    // Y ticks.
    let step = nice_step(y1 - y0);
    let mut v = (y0 / step).ceil() * step;
    while v <= y1 + step * 1e-9 {
        let y = py(v);
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            L,
            L + pw,
            L - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
        v += step;
    }
    // X ticks: a grid line at plot position `x` labelled with the data value `v`.
    let mut x_tick = |x: f64, v: f64| {
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{T:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            T + ph,
            T + ph + 18.0,
            fmt_tick(v)
        );
    };
    if c.log_x {
        let mut e = x0.floor();
        while e <= x1 + 1e-9 {
            if e >= x0 - 1e-9 {
                x_tick(L + (e - x0) / (x1 - x0) * pw, 10f64.powf(e));
            }
            e += 1.0;
        }
    } else {
        let step = nice_step(x1 - x0);
        let mut v = (x0 / step).ceil() * step;
        while v <= x1 + step * 1e-9 {
            x_tick(L + (v - x0) / (x1 - x0) * pw, v);
            v += step;
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        L + pw / 2.0,
        H - 16.0,
        esc(c.x_label)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        T + ph / 2.0,
        esc(c.y_label)
    );
    // Series and legend.
    for (i, se) in series.iter().enumerate() {
        let col = COLOURS[i % COLOURS.len()];
        let mut d = String::new();
        for &(x, y) in se.points.iter().filter(|&&(x, y)| ok(x, y)) {
            let _ = write!(d, "{:.1},{:.1} ", px(x), py(y));
        }
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{col}" stroke-width="1.8"/>"#,
            d.trim_end()
        );
        let ly = T + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{col}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            W - R + 12.0,
            W - R + 36.0,
            W - R + 42.0,
            ly + 4.0,
            esc(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_points_and_labels() {
        let svg = line_chart(
            &Chart {
                title: "t<1>",
                x_label: "x",
                y_label: "y",
                log_x: true,
                y_from_zero: true,
            },
            &[Series {
                label: "a".into(),
                points: vec![(1.0, 0.0), (10.0, 0.5), (100.0, 1.0), (0.0, 2.0)],
            }],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("t&lt;1&gt;"));
        // Three drawable points (x = 0 is skipped on a log axis).
        let poly = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        assert_eq!(poly.matches(',').count(), 3);
    }
}
