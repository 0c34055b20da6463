//! The loss is written for data parallelism (local rows, gathered columns): the mean over
//! ranks of each rank's loss, and its gradient, equal the single-device loss of the whole
//! batch. A multi-GPU trainer then only adds the gather.

use candle_core::{Device, Tensor, Var};
use dfndr_trainer::loss::{dr_loss, CaptionSet, LossConfig, LossInputs, Rows, TeacherLayout};
use dfndr_trainer::step::l2_normalize;

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let n = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    (d / n).sqrt()
}

#[test]
fn ranks_with_gathered_columns_equal_one_device() {
    let dev = Device::Cpu;
    let (n, d, ranks) = (8, 6, 2);
    let layout = TeacherLayout {
        dims: vec![4, 4],
        scales: vec![70.0, 60.0],
    };
    let config = LossConfig {
        contrastive_weight: 0.25,
        distill_weight: 0.75,
    };
    let raw = || Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap()).unwrap();
    let (img, gt, syn) = (raw(), raw(), raw());
    let teacher = || l2_normalize(&Tensor::randn(0f32, 1.0, (n, 8), &dev).unwrap()).unwrap();
    let (t_img, t_gt, t_syn) = (teacher(), teacher(), teacher());
    let scale = Var::from_tensor(&Tensor::new(3.0f32, &dev).unwrap()).unwrap();
    let (fi, fg, fs) = (
        l2_normalize(img.as_tensor()).unwrap(),
        l2_normalize(gt.as_tensor()).unwrap(),
        l2_normalize(syn.as_tensor()).unwrap(),
    );
    let s = scale.as_tensor().exp().unwrap();
    let whole = dr_loss(
        &LossInputs {
            image: Rows::single(&fi),
            teacher_image: Rows::single(&t_img),
            gt: CaptionSet {
                student: Rows::single(&fg),
                teacher: Rows::single(&t_gt),
            },
            syn: CaptionSet {
                student: Rows::single(&fs),
                teacher: Rows::single(&t_syn),
            },
            scale: &s,
            offset: 0,
        },
        &layout,
        &config,
    )
    .unwrap()
    .total;
    let b = n / ranks;
    let mut per_rank = Vec::new();
    for r in 0..ranks {
        let local = |t: &Tensor| t.narrow(0, r * b, b).unwrap();
        let (li, lg, ls) = (local(&fi), local(&fg), local(&fs));
        let (lti, ltg, lts) = (local(&t_img), local(&t_gt), local(&t_syn));
        let terms = dr_loss(
            &LossInputs {
                image: Rows {
                    local: &li,
                    global: &fi,
                },
                teacher_image: Rows {
                    local: &lti,
                    global: &t_img,
                },
                gt: CaptionSet {
                    student: Rows {
                        local: &lg,
                        global: &fg,
                    },
                    teacher: Rows {
                        local: &ltg,
                        global: &t_gt,
                    },
                },
                syn: CaptionSet {
                    student: Rows {
                        local: &ls,
                        global: &fs,
                    },
                    teacher: Rows {
                        local: &lts,
                        global: &t_syn,
                    },
                },
                scale: &s,
                offset: r * b,
            },
            &layout,
            &config,
        )
        .unwrap();
        per_rank.push(terms.total);
    }
    let mean = Tensor::stack(&per_rank, 0).unwrap().mean(0).unwrap();
    assert!(rel(&mean, &whole) < 1e-6);
    let g_whole = whole.backward().unwrap();
    let g_ranks = mean.backward().unwrap();
    for v in [&img, &gt, &syn, &scale] {
        let e = rel(
            g_ranks.get(v.as_tensor()).unwrap(),
            g_whole.get(v.as_tensor()).unwrap(),
        );
        assert!(e < 1e-5, "gradient differs by {e}");
    }
}

/// Teacher embeddings that do not match the declared layout are an error naming the shapes.
#[test]
fn wrong_teacher_width_is_a_clear_error() {
    let dev = Device::Cpu;
    let f = l2_normalize(&Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap()).unwrap();
    let t = Tensor::randn(0f32, 1.0, (4, 10), &dev).unwrap();
    let s = Tensor::new(10f32, &dev).unwrap();
    let err = dr_loss(
        &LossInputs {
            image: Rows::single(&f),
            teacher_image: Rows::single(&t),
            gt: CaptionSet {
                student: Rows::single(&f),
                teacher: Rows::single(&t),
            },
            syn: CaptionSet {
                student: Rows::single(&f),
                teacher: Rows::single(&t),
            },
            scale: &s,
            offset: 0,
        },
        &TeacherLayout {
            dims: vec![4, 4],
            scales: vec![70.0, 60.0],
        },
        &LossConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("[4, 10]") && err.contains("[4, 8]"), "{err}");
}
