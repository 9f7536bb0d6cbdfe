//! Helpers shared by the benches.

/// Whether this is a `--bench` run (not `cargo test`'s quick check of bench targets) whose name
/// filter, if any, can select the benchmark `id`: such runs also print a plain-loop summary.
pub fn run_selects(id: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        return false;
    }
    // Positional words that are not option values (numbers) act as name filters.
    let words: Vec<&String> = args
        .iter()
        .filter(|a| !a.starts_with('-') && a.parse::<f64>().is_err())
        .collect();
    words.is_empty() || words.iter().any(|w| id.contains(w.as_str()))
}
