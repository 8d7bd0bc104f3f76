//! Parity of `bigroc::diffusion` with guided-diffusion-sdk 1.0.0: beta/alpha arrays, timestep
//! respacing, p_mean_variance for every variance type, q_sample, one guided ancestral step with
//! given noise, and whole guided DDIM (eta 0 and 0.5) and ancestral (rescaled timesteps)
//! trajectories from a given x_T, on tiny random-weight networks.
//! Error measure: max |ours - ref| / max |ref|. Tolerances: 1e-10 for the f64 schedule arrays,
//! 1e-4 per step, 1e-3 over a trajectory.

mod adm_support;

use adm_support::{check, rel_err, Fixture};
use anyhow::Result;
use bigroc::diffusion::{
    named_beta_schedule, respace_betas, space_timesteps, ClassifierGuidance, CondFn,
    DiffusionConfig, GaussianDiffusion, Guided, NoiseSchedule, Sampler, VarianceType,
};
use bigroc_models::adm::{EncoderUNetConfig, EncoderUNetModel, UNetConfig, UNetModel};
use candle_core::{DType, Tensor};

const STEP_TOL: f64 = 1e-4;
const TRAJ_TOL: f64 = 1e-3;

fn f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1()?)
}

fn vec_rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn beta_schedules_and_derived_arrays() -> Result<()> {
    let fx = Fixture::load("adm_schedules")?;
    for schedule in [NoiseSchedule::Linear, NoiseSchedule::Cosine] {
        let d = GaussianDiffusion::from_betas(
            &named_beta_schedule(schedule, 1000),
            (0..1000).collect(),
            1000,
            VarianceType::FixedSmall,
            false,
        )?;
        let ours: [(&str, &Vec<f64>); 12] = [
            ("betas", &d.betas),
            ("alphas_cumprod", &d.alphas_cumprod),
            ("alphas_cumprod_prev", &d.alphas_cumprod_prev),
            ("alphas_cumprod_next", &d.alphas_cumprod_next),
            ("sqrt_alphas_cumprod", &d.sqrt_alphas_cumprod),
            ("sqrt_one_minus_alphas_cumprod", &d.sqrt_one_minus_alphas_cumprod),
            ("sqrt_recip_alphas_cumprod", &d.sqrt_recip_alphas_cumprod),
            ("sqrt_recipm1_alphas_cumprod", &d.sqrt_recipm1_alphas_cumprod),
            ("posterior_variance", &d.posterior_variance),
            ("posterior_log_variance_clipped", &d.posterior_log_variance_clipped),
            ("posterior_mean_coef1", &d.posterior_mean_coef1),
            ("posterior_mean_coef2", &d.posterior_mean_coef2),
        ];
        let mut worst = 0f64;
        for (name, arr) in ours {
            let e = vec_rel_err(arr, &f64_vec(&fx.get(&format!("{schedule}_1000.{name}"))?)?);
            assert!(e <= 1e-10, "{schedule} {name}: rel err {e:.3e}");
            worst = worst.max(e);
        }
        println!("{schedule} 1000 steps, 12 arrays: max rel err {worst:.3e} (tol 1e-10)");
    }
    Ok(())
}

#[test]
fn timestep_respacing_and_respaced_betas() -> Result<()> {
    let fx = Fixture::load("adm_schedules")?;
    let cases = fx.config["respaced"].as_array().unwrap().clone();
    assert!(cases.len() >= 10);
    for case in cases {
        let key = case["key"].as_str().unwrap();
        let schedule: NoiseSchedule = case["schedule"].as_str().unwrap().parse()?;
        let steps = case["steps"].as_u64().unwrap() as usize;
        let spacing = case["respacing"].as_str().unwrap();
        let keep = space_timesteps(steps, spacing)?;
        let expected: Vec<i64> = fx.get(&format!("{key}.timestep_map"))?.to_vec1()?;
        let expected: Vec<usize> = expected.into_iter().map(|v| v as usize).collect();
        assert_eq!(keep, expected, "{schedule} {steps} '{spacing}': kept steps differ");
        let betas = respace_betas(&named_beta_schedule(schedule, steps), &keep);
        let e = vec_rel_err(&betas, &f64_vec(&fx.get(&format!("{key}.betas"))?)?);
        println!("{schedule} {steps} '{spacing}': {} steps identical, betas rel err {e:.3e}", keep.len());
        assert!(e <= 1e-10, "{schedule} {steps} '{spacing}': betas rel err {e:.3e}");
    }
    for case in fx.config["invalid"].as_array().unwrap() {
        let steps = case["steps"].as_u64().unwrap() as usize;
        let spacing = case["respacing"].as_str().unwrap();
        let ours = space_timesteps(steps, spacing);
        assert!(!case["error"].is_null(), "fixture case '{spacing}' should be an error in the reference");
        let err = ours.expect_err("an invalid respacing must be an error");
        println!("'{spacing}' of {steps}: rejected: {err}");
    }
    Ok(())
}

#[test]
fn p_mean_variance_every_variance_type_and_q_sample() -> Result<()> {
    let fx = Fixture::load("adm_gaussian")?;
    let x = fx.get("x")?;
    let out6 = fx.get("model_output")?;
    let mut worst = 0f64;
    let cases = fx.config["cases"].as_array().unwrap();
    for case in cases {
        let key = case["key"].as_str().unwrap();
        let var_type: VarianceType = serde_json::from_value(case["var_type"].clone())?;
        let t = case["t"].as_u64().unwrap() as usize;
        let clip = case["clip_denoised"].as_bool().unwrap();
        let d = GaussianDiffusion::new(&DiffusionConfig {
            steps: 1000,
            noise_schedule: NoiseSchedule::Linear,
            learn_sigma: var_type == VarianceType::LearnedRange,
            sigma_small: var_type == VarianceType::FixedSmall,
            timestep_respacing: "20".into(),
            rescale_timesteps: false,
        })?;
        assert_eq!(d.var_type, var_type);
        let out = if var_type == VarianceType::LearnedRange {
            out6.clone()
        } else {
            out6.narrow(1, 0, 3)?
        };
        let r = d.p_mean_variance(&out, &x, t, clip)?;
        for (name, ours) in [
            ("mean", &r.mean),
            ("variance", &r.variance),
            ("log_variance", &r.log_variance),
            ("pred_xstart", &r.pred_xstart),
        ] {
            let e = rel_err(ours, &fx.get(&format!("{key}.{name}"))?)?;
            assert!(e <= STEP_TOL, "{key}.{name}: rel err {e:.3e}");
            worst = worst.max(e);
        }
    }
    println!("p_mean_variance, {} cases x 4 outputs: max rel err {worst:.3e} (tol {STEP_TOL:.0e})", cases.len());

    let d = GaussianDiffusion::new(&DiffusionConfig {
        steps: 1000,
        noise_schedule: NoiseSchedule::Cosine,
        timestep_respacing: "20".into(),
        ..Default::default()
    })?;
    let t: Vec<i64> = fx.get("q_sample.t")?.to_vec1()?;
    let t: Vec<usize> = t.into_iter().map(|v| v as usize).collect();
    let ours = d.q_sample(&x, &t, &fx.get("q_sample.noise")?)?;
    check("q_sample (per-example t)", &ours, &fx.get("q_sample.out")?, STEP_TOL)?;
    Ok(())
}

struct SamplerModels {
    unet: UNetModel,
    improved: UNetModel,
    classifier: EncoderUNetModel,
}

fn sampler_models() -> Result<SamplerModels> {
    let fx = Fixture::load("adm_sampler_models")?;
    let unet_cfg: UNetConfig = fx.config_of("unet")?;
    let improved_cfg: UNetConfig = fx.config_of("improved")?;
    let clf_cfg: EncoderUNetConfig = fx.config_of("classifier")?;
    Ok(SamplerModels {
        unet: UNetModel::new(&unet_cfg, fx.var_builder("unet", DType::F32))?,
        improved: UNetModel::new(&improved_cfg, fx.var_builder("improved", DType::F32))?,
        classifier: EncoderUNetModel::new(&clf_cfg, fx.var_builder("classifier", DType::F32))?,
    })
}

fn diffusion_of(fx: &Fixture) -> Result<GaussianDiffusion> {
    let c = &fx.config["diffusion"];
    GaussianDiffusion::new(&DiffusionConfig {
        steps: c["steps"].as_u64().unwrap() as usize,
        noise_schedule: c["noise_schedule"].as_str().unwrap().parse()?,
        learn_sigma: c["learn_sigma"].as_bool().unwrap(),
        sigma_small: false,
        timestep_respacing: c["timestep_respacing"].as_str().unwrap().into(),
        rescale_timesteps: c["rescale_timesteps"].as_bool().unwrap(),
    })
}

#[test]
fn guided_p_sample_step_with_given_noise() -> Result<()> {
    let fx = Fixture::load("adm_p_sample")?;
    let m = sampler_models()?;
    let d = diffusion_of(&fx)?;
    let scale = fx.config["classifier_scale"].as_f64().unwrap();
    let x = fx.get("x")?;
    let y = fx.get("y")?;
    let guidance = ClassifierGuidance {
        classifier: &m.classifier,
        scale,
    };
    let g = Guided {
        model: &m.unet,
        cond: Some(&guidance),
        labels: Some(&y),
        clip_denoised: true,
    };
    for step in fx.config["steps"].as_array().unwrap() {
        let key = step["key"].as_str().unwrap();
        let t = step["t"].as_u64().unwrap() as usize;
        let ts = d.model_timesteps(t, 2, x.device())?;
        let out = m.unet.forward(&x, &ts, Some(&y))?;
        let pmv = d.p_mean_variance(&out, &x, t, true)?;
        check(&format!("{key} mean"), &pmv.mean, &fx.get(&format!("{key}.mean"))?, STEP_TOL)?;
        check(&format!("{key} variance"), &pmv.variance, &fx.get(&format!("{key}.variance"))?, STEP_TOL)?;
        check(&format!("{key} pred_xstart"), &pmv.pred_xstart, &fx.get(&format!("{key}.pred_xstart"))?, STEP_TOL)?;
        let grad = (guidance.grad(&x, &ts, Some(&y))? / scale)?;
        check(&format!("{key} classifier grad at the original t"), &grad, &fx.get(&format!("{key}.grad"))?, STEP_TOL)?;
        let s = d.p_sample(&g, &x, t, &fx.get(&format!("{key}.noise"))?)?;
        check(&format!("{key} guided sample"), &s.sample, &fx.get(&format!("{key}.sample"))?, STEP_TOL)?;
    }
    Ok(())
}

/// Runs the fixture's trajectory with and without guidance; returns (guided max rel err over all
/// steps, unguided final rel err against the guided reference).
fn trajectory(name: &str) -> Result<()> {
    let fx = Fixture::load(name)?;
    let m = sampler_models()?;
    let d = diffusion_of(&fx)?;
    let unet = match fx.config["model"].as_str().unwrap() {
        "unet" => &m.unet,
        "improved" => &m.improved,
        other => anyhow::bail!("unknown model {other}"),
    };
    let sampler = match fx.config["method"].as_str().unwrap() {
        "ddim" => Sampler::Ddim {
            eta: fx.config["eta"].as_f64().unwrap(),
        },
        _ => Sampler::Ancestral,
    };
    let guidance = ClassifierGuidance {
        classifier: &m.classifier,
        scale: fx.config["classifier_scale"].as_f64().unwrap(),
    };
    let y = fx.get("y")?;
    let noise = fx.get("noise")?;
    let samples = fx.get("samples")?;
    let pred_xstarts = fx.get("pred_xstarts")?;
    let run = |cond: Option<&dyn CondFn>| -> Result<(Tensor, f64, f64)> {
        let g = Guided {
            model: unet,
            cond,
            labels: Some(&y),
            clip_denoised: true,
        };
        let mut worst_sample = 0f64;
        let mut worst_x0 = 0f64;
        let last = d.sample_loop(
            sampler,
            &g,
            &fx.get("x_T")?,
            &mut |k, _| Ok(noise.get(k)?),
            &mut |k, _, out| {
                worst_sample = worst_sample.max(rel_err(&out.sample, &samples.get(k)?)?);
                worst_x0 = worst_x0.max(rel_err(&out.pred_xstart, &pred_xstarts.get(k)?)?);
                Ok(())
            },
        )?;
        Ok((last, worst_sample, worst_x0))
    };
    let steps = d.num_timesteps();
    let expected_final = samples.get(steps - 1)?;
    let (last, worst_sample, worst_x0) = run(Some(&guidance))?;
    println!(
        "{name}: {steps} steps, max rel err over all x_t-1 {worst_sample:.3e}, over all pred x0 {worst_x0:.3e} (tol {TRAJ_TOL:.0e})"
    );
    check(&format!("{name} final sample"), &last, &expected_final, TRAJ_TOL)?;
    assert!(worst_sample <= TRAJ_TOL && worst_x0 <= TRAJ_TOL);
    // The guidance must matter far beyond the tolerance, or this test could not see it break.
    let (unguided, _, _) = run(None)?;
    let effect = rel_err(&unguided, &expected_final)?;
    println!("{name}: unguided final vs guided reference: rel diff {effect:.3e}");
    assert!(effect > 30.0 * TRAJ_TOL, "guidance barely changes the trajectory ({effect:.3e})");
    Ok(())
}

#[test]
fn guided_ddim_trajectory_eta0() -> Result<()> {
    trajectory("adm_traj_ddim_eta0")
}

#[test]
fn guided_ddim_trajectory_eta05_given_noise() -> Result<()> {
    trajectory("adm_traj_ddim_eta05")
}

#[test]
fn guided_ancestral_trajectory_rescaled_timesteps_improved_layout() -> Result<()> {
    trajectory("adm_traj_p_sample_rescaled")
}

#[test]
fn rescaled_model_timesteps() -> Result<()> {
    let d = GaussianDiffusion::new(&DiffusionConfig {
        steps: 4000,
        noise_schedule: NoiseSchedule::Cosine,
        learn_sigma: true,
        timestep_respacing: "ddim100".into(),
        rescale_timesteps: true,
        ..Default::default()
    })?;
    assert_eq!(d.num_timesteps(), 100);
    assert_eq!(d.timestep_map[1], 40);
    assert_eq!(d.model_timestep(1), 10.0);
    assert_eq!(d.model_timestep(99), 990.0);
    Ok(())
}
