//! Time the native decode step on random nano-125m-shaped weights, without Python.
//! Weights in huge-page mappings as the engine loads them (`share_weight_pages`).
//! Usage: cargo run --release --example decode_step -- [BATCH] [CONTEXT] [STEPS]
use std::sync::Arc;

use half::f16;
use std::time::Instant;

use _ternary::decode::{DecodeLayer, DecodeModel, Exec, LayerParts, Mhc, Rope, SeqCache, STAGES};
use _ternary::format::TernaryShape;
use _ternary::kernels::active_isa;
use _ternary::topology::Topology;
use _ternary::{share_weight_pages, Int8Shape, PackedInt8, PackedTernary, Pool};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let b = args.first().copied().unwrap_or(8);
    let context = args.get(1).copied().unwrap_or(96);
    let steps = args.get(2).copied().unwrap_or(64);
    let (d, layers, heads, kv_heads, hd, ffn, vocab) = (768, 12, 12, 4, 64, 2688, 32000);
    let mut seed = 12345u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut ternary = |rows: usize, cols: usize| {
        let shape = TernaryShape { rows, cols, group_size: 128 };
        let codes: Vec<i8> = (0..rows * cols).map(|_| (next() % 3) as i8 - 1).collect();
        let scales = vec![0.02f32; rows * shape.groups()];
        PackedTernary::new(&codes, &scales, shape).expect("ternary")
    };
    let mhc = || Some(Mhc { h_pre: vec![0.5, 0.5], h_post: vec![1.0, 1.0], h_res: vec![1.0, 0.0, 0.0, 1.0] });
    // [qkv, o, gate_up, down] per layer, then moved into huge-page mappings as the engine's loader does
    let mats: Vec<PackedTernary> = (0..layers)
        .flat_map(|_| [((heads + 2 * kv_heads) * hd, d), (d, heads * hd), (2 * ffn, d), (d, ffn)])
        .map(|(rows, cols)| ternary(rows, cols))
        .collect();
    let q: Vec<i8> = (0..vocab * d).map(|i| (i % 251) as i8).collect();
    let head = PackedInt8::new(&q, &vec![0.001; vocab], Int8Shape { rows: vocab, cols: d }).expect("head");
    let pool = Pool::new(1, &Topology::detect()).expect("pool");
    let (mats, mut heads_shared) =
        share_weight_pages(&mats.iter().collect::<Vec<_>>(), &[&head], &pool).expect("share pages");
    let head = Arc::new(heads_shared.remove(0));
    let mut mats = mats.into_iter().map(Arc::new);
    let decode_layers: Vec<Arc<DecodeLayer>> = (0..layers)
        .map(|_| {
            let p = LayerParts {
                attn_norm: vec![1.0; d],
                qkv: mats.next().expect("qkv"),
                o: mats.next().expect("o"),
                attn_sub_norm: None,
                attn_mhc: mhc(),
                ffn_norm: vec![1.0; d],
                gate_up: mats.next().expect("gate_up"),
                down: mats.next().expect("down"),
                ffn_sub_norm: None,
                ffn_mhc: mhc(),
                n_heads: heads,
                n_kv_heads: kv_heads,
                eps: 1e-5,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            Arc::new(DecodeLayer::new(p).expect("layer"))
        })
        .collect();
    let model = DecodeModel::new(decode_layers, vec![1.0; d], head).expect("model");
    let capacity = context + steps + 1;
    let per_seq = layers * kv_heads * capacity * hd;
    let mut k: Vec<Vec<f16>> =
        (0..b).map(|_| (0..per_seq).map(|i| f16::from_f32(((i % 97) as f32 - 48.0) * 0.01)).collect()).collect();
    let mut v = k.clone();
    let mut xs: Vec<f32> = (0..2 * b * d).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
    let (cos, sin) = (vec![1.0f32; b * hd], vec![0.0f32; b * hd]);
    let ex = Exec { isa: active_isa().expect("isa"), threads: rayon::current_num_threads() };
    let mut run = |pos: usize| {
        let mut caches: Vec<SeqCache> = k.iter_mut().zip(v.iter_mut()).map(|(k, v)| SeqCache { k, v, pos }).collect();
        let mut x = xs.clone();
        let logits = model.step(&mut x, &Rope { cos: &cos, sin: &sin }, &mut caches, ex).expect("step");
        xs.iter_mut().zip(&x).for_each(|(a, b)| *a = 0.5 * *a + 0.5 * b.clamp(-4.0, 4.0));
        std::hint::black_box(logits);
    };
    for pos in context - 8..context {
        run(pos); // warm-up
    }
    model.reset_times();
    let t = Instant::now();
    for pos in context..context + steps {
        run(pos);
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
    println!(
        "{} B={b} context {context}: {ms:.2} ms/step, {:.0} tok/s, {} threads",
        ex.isa.name(),
        b as f64 * 1e3 / ms,
        ex.threads
    );
    let parts: Vec<String> =
        STAGES.iter().zip(model.seconds()).map(|(s, t)| format!("{s} {:.2}", t * 1e3 / steps as f64)).collect();
    println!("  ms per step: {}", parts.join(", "));
}
