//! Prints how alike two WAV files are (envelope similarity, best lag in ms).
//! `cargo run -p voice --example similarity -- SENT.wav RECEIVED.wav`
fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 2 {
        eprintln!("usage: similarity SENT.wav RECEIVED.wav");
        std::process::exit(2);
    }
    let x = voice::wav::read(a[0].as_ref()).unwrap_or_else(|e| panic!("{e}"));
    let y = voice::wav::read(a[1].as_ref()).unwrap_or_else(|e| panic!("{e}"));
    let (s, lag) = voice::signal::envelope_similarity(&x.samples, &y.samples, 8_000);
    println!("similarity {s:.4} at lag {lag} ms");
}
