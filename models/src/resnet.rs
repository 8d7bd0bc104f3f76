//! The adversarially robust ResNet classifiers BIGRoC refines with: the CIFAR-layout ResNets of the
//! `robustness` library (`cifar_models/resnet.py`) and the ImageNet-layout ResNets of torchvision
//! (which `robustness.imagenet_models` copies), with robustness' input normalization inside the model.
//!
//! Parameter names are those of the original state dicts with the wrapper prefixes stripped
//! (`module.model.` / `module.attacker.model.` in robustness checkpoints): `conv1`, `bn1`,
//! `layer{1..4}.{i}.conv1`, ..., the projection shortcut as `shortcut.0`/`shortcut.1` (CIFAR) or
//! `downsample.0`/`downsample.1` (ImageNet), and the head as `linear` (CIFAR) or `fc` (ImageNet).
//!
//! Two modes, as PyTorch's `train()`/`eval()`: [`ResNet::forward`] (= `forward_t(x, false)`) is
//! inference: batch norm uses its running statistics and every weight is a constant, so only the input
//! gets a gradient, cheaply (PGD, guidance, evaluation). [`ResNet::forward_t`]`(x, true)` is training:
//! batch norm normalizes with the batch's statistics and updates its running statistics in place (as
//! `torch.nn.BatchNorm2d` with momentum 0.1), and every weight gets a gradient. Built from a
//! `VarBuilder` over a `candle_nn::VarMap`, the model's weights and running statistics ARE that map's
//! `Var`s (shared storage): gradients reach them, optimizer steps on them change the model, and the
//! running statistics the model updates are the map's. A fresh map is initialized as PyTorch would
//! (see [`ResNet::new`]). `num_batches_tracked` is neither read nor kept (with a fixed momentum
//! PyTorch does not use it either).

use crate::conv::conv2d_trainable;
use crate::conv_bn::conv2d_bn_eval;
use candle_core::{bail, DType, Module, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ops;

/// Which reference implementation's network layout (and parameter names) to follow.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// torchvision / robustness `imagenet_models`: 7x7 stride-2 stem, 3x3 max pool, global average
    /// pool, head `fc`, shortcut `downsample`.
    Imagenet,
    /// robustness `cifar_models`: 3x3 stride-1 stem, no max pool, `avg_pool2d(4)`, head `linear`,
    /// shortcut `shortcut`.
    Cifar,
}

/// Residual block type.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34).
    Basic,
    /// 1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4 (ResNet-50/101/152).
    Bottleneck,
}

impl BlockKind {
    /// Output channels per unit of block width.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Architecture of a ResNet classifier, including the input normalization it was trained with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResNetConfig {
    pub layout: Layout,
    pub block: BlockKind,
    /// Residual blocks per stage.
    pub blocks: [usize; 4],
    /// Block width (planes) per stage; a stage outputs `width * block.expansion()` channels.
    pub widths: [usize; 4],
    pub num_classes: usize,
    /// Per-channel mean and standard deviation subtracted/divided after clamping pixels to [0, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// robustness `datasets.CIFAR` normalization.
pub const CIFAR_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR_STD: [f32; 3] = [0.2023, 0.1994, 0.2010];
/// robustness `datasets.ImageNet` (and torchvision) normalization.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn depth_blocks(depth: usize) -> Result<(BlockKind, [usize; 4])> {
    Ok(match depth {
        18 => (BlockKind::Basic, [2, 2, 2, 2]),
        34 => (BlockKind::Basic, [3, 4, 6, 3]),
        50 => (BlockKind::Bottleneck, [3, 4, 6, 3]),
        101 => (BlockKind::Bottleneck, [3, 4, 23, 3]),
        152 => (BlockKind::Bottleneck, [3, 8, 36, 3]),
        d => bail!("ResNet depth {d} is not one of 18, 34, 50, 101, 152"),
    })
}

impl ResNetConfig {
    /// robustness' CIFAR ResNet-`depth` with width multiplier `wm` (`ResNet50(wm=..)`): widths are
    /// `int(w * wm)` for w in 64, 128, 256, 512, as `cifar_models/resnet.py` computes them.
    pub fn cifar(depth: usize, wm: f64, num_classes: usize) -> Result<Self> {
        let (block, blocks) = depth_blocks(depth)?;
        if !(wm.is_finite() && wm > 0.0) {
            bail!("ResNet width multiplier must be positive, got {wm}")
        }
        let widths = [64usize, 128, 256, 512].map(|w| (w as f64 * wm) as usize);
        if widths.contains(&0) {
            bail!("ResNet width multiplier {wm} gives a zero width ({widths:?})")
        }
        Ok(Self {
            layout: Layout::Cifar,
            block,
            blocks,
            widths,
            num_classes,
            mean: CIFAR_MEAN,
            std: CIFAR_STD,
        })
    }

    /// torchvision's / robustness' ImageNet ResNet-`depth` (widths 64..512, ImageNet normalization).
    pub fn imagenet(depth: usize, num_classes: usize) -> Result<Self> {
        let (block, blocks) = depth_blocks(depth)?;
        Ok(Self {
            layout: Layout::Imagenet,
            block,
            blocks,
            widths: [64, 128, 256, 512],
            num_classes,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        })
    }

    /// Size of the pre-head feature vector ([`ResNet::forward_features`]).
    pub fn feature_dim(&self) -> usize {
        self.widths[3] * self.block.expansion()
    }
}

/// Whether a state-dict key names a batch-norm buffer (running statistics, `num_batches_tracked`)
/// rather than a trainable parameter: the keys an optimizer must leave alone. Such `Var`s never
/// receive a gradient from this module.
pub fn is_buffer(name: &str) -> bool {
    ["running_mean", "running_var", "num_batches_tracked"]
        .iter()
        .any(|b| name == *b || name.ends_with(&format!(".{b}")))
}

/// PyTorch's default initialization of `nn.Conv2d` and `nn.Linear` weights (`kaiming_uniform_` with
/// `a = sqrt(5)`), which robustness' CIFAR ResNets keep: uniform in `+-1 / sqrt(fan_in)`; also the
/// default `nn.Linear` bias.
fn torch_default_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Bias-free convolution (every ResNet convolution is followed by batch norm).
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new(
        vb: VarBuilder,
        layout: Layout,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let init = match layout {
            Layout::Cifar => torch_default_init(c_in * kernel * kernel),
            // torchvision re-initializes every convolution: kaiming_normal_(mode='fan_out', relu).
            Layout::Imagenet => Init::Kaiming {
                dist: candle_nn::init::NormalOrUniform::Normal,
                fan: candle_nn::init::FanInOut::FanOut,
                non_linearity: candle_nn::init::NonLinearity::ReLU,
            },
        };
        let weight = vb.get_with_hints((c_out, c_in, kernel, kernel), "weight", init)?;
        Ok(Self {
            weight,
            stride,
            padding,
        })
    }

    /// A clear error for feature maps smaller than the kernel (an input image too small).
    fn check_fits(&self, x: &Tensor) -> Result<()> {
        let (_, _, h, w) = x.dims4()?;
        let k = self.weight.dim(2)?;
        if h + 2 * self.padding < k || w + 2 * self.padding < k {
            bail!("ResNet: a {h}x{w} feature map is too small for a {k}x{k} convolution (input image too small)")
        }
        Ok(())
    }

    /// Training ([`conv2d_trainable`]): the input and the weight get gradients, without candle's
    /// conv2d backward (slow on CPU). Inference goes through [`conv_bn`].
    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.check_fits(x)?;
        conv2d_trainable(x, &self.weight, self.stride, self.padding)
    }
}

/// `torch.nn.BatchNorm2d` (eps 1e-5, momentum 0.1, affine, tracking running statistics), keeping its
/// raw parameters. The running statistics are `Var`s updated in place by training-mode forwards (the
/// VarMap's own when the model was built from one).
#[derive(Debug, Clone)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm {
    const EPS: f64 = 1e-5;
    const MOMENTUM: f64 = 0.1;

    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        // `Var::from_tensor` shares a tensor that already is a variable (a VarMap's) and copies any
        // other into a variable of the model's own.
        let stat = |name: &str, init: f64| -> Result<Var> {
            Var::from_tensor(&vb.get_with_hints(c, name, Init::Const(init))?)
        };
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            running_mean: stat("running_mean", 0.0)?,
            running_var: stat("running_var", 1.0)?,
        })
    }

    /// Inference mode's per-channel `(scale, shift)` (constants): running statistics folded the way
    /// PyTorch's CPU kernel evaluates batch norm, `x * (weight / sqrt(var + eps)) + (bias - mean *
    /// weight / sqrt(var + eps))`.
    fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let mean = self.running_mean.as_detached_tensor();
        let var = self.running_var.as_detached_tensor();
        let scale = (self.weight.detach() * (var + Self::EPS)?.sqrt()?.recip()?)?;
        let shift = (self.bias.detach() - (mean * &scale)?)?;
        Ok((scale, shift))
    }

    /// Batch statistics over (N, H, W): `(x - mean) / sqrt(var + eps) * weight + bias` with the biased
    /// variance, differentiable w.r.t. the input, weight and bias ([`ops::batch_norm_train`]); then
    /// `running = (1 - momentum) * running + momentum * batch` with the unbiased variance.
    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let (y, mean, var) = ops::batch_norm_train(x, &self.weight, &self.bias, Self::EPS)?;
        let count = (n * h * w) as f64;
        let m = Self::MOMENTUM;
        let update = |running: &Var, batch: Tensor| -> Result<()> {
            running.set(&((running.as_tensor() * (1.0 - m))? + (batch * m)?)?)
        };
        update(&self.running_mean, mean)?;
        update(&self.running_var, (var * (count / (count - 1.0)))?)?;
        Ok(y)
    }
}

/// What follows a convolution and its batch norm inside a block.
#[derive(Clone, Copy)]
enum Then<'a> {
    Nothing,
    Relu,
    /// Add the shortcut, then ReLU: the end of a residual block.
    AddRelu(&'a Tensor),
}

/// `then(bn(conv(x)))`. In inference mode one fused op ([`conv2d_bn_eval`]): the convolution with
/// batch norm's per-channel scale and shift, the shortcut and the ReLU applied to its output in place.
fn conv_bn(conv: &Conv, bn: &BatchNorm, x: &Tensor, train: bool, then: Then) -> Result<Tensor> {
    if train {
        let y = bn.forward_train(&conv.forward_train(x)?)?;
        let fused = crate::conv::uses_im2col(&y);
        return match then {
            Then::Nothing => Ok(y),
            Then::Relu if fused => crate::train_ops::add_relu(&y, None),
            Then::Relu => y.relu(),
            Then::AddRelu(shortcut) if fused => crate::train_ops::add_relu(&y, Some(shortcut)),
            Then::AddRelu(shortcut) => (y + shortcut)?.relu(),
        };
    }
    conv.check_fits(x)?;
    let (scale, shift) = bn.eval_affine()?;
    let (residual, relu) = match then {
        Then::Nothing => (None, false),
        Then::Relu => (None, true),
        Then::AddRelu(shortcut) => (Some(shortcut), true),
    };
    conv2d_bn_eval(
        x,
        &conv.weight,
        &scale,
        &shift,
        residual,
        relu,
        conv.stride,
        conv.padding,
    )
}

/// Convolution followed by batch norm: the projection shortcut of a block that changes shape.
#[derive(Debug, Clone)]
struct Shortcut {
    conv: Conv,
    bn: BatchNorm,
}

impl Shortcut {
    /// `None` when the block keeps its input's shape (identity shortcut).
    fn new(
        vb: VarBuilder,
        layout: Layout,
        c_in: usize,
        c_out: usize,
        stride: usize,
    ) -> Result<Option<Self>> {
        if stride == 1 && c_in == c_out {
            return Ok(None);
        }
        let vb = vb.pp(match layout {
            Layout::Cifar => "shortcut",
            Layout::Imagenet => "downsample",
        });
        let conv = Conv::new(vb.pp("0"), layout, c_in, c_out, 1, stride, 0)?;
        let bn = BatchNorm::new(vb.pp("1"), c_out)?;
        Ok(Some(Self { conv, bn }))
    }

    fn forward_t(this: &Option<Self>, x: &Tensor, train: bool) -> Result<Tensor> {
        match this {
            Some(s) => conv_bn(&s.conv, &s.bn, x, train, Then::Nothing),
            None => Ok(x.clone()),
        }
    }
}

/// relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the stride sits on conv1.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    shortcut: Option<Shortcut>,
}

impl BasicBlock {
    fn new(
        vb: VarBuilder,
        layout: Layout,
        c_in: usize,
        planes: usize,
        stride: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv1: Conv::new(vb.pp("conv1"), layout, c_in, planes, 3, stride, 1)?,
            bn1: BatchNorm::new(vb.pp("bn1"), planes)?,
            conv2: Conv::new(vb.pp("conv2"), layout, planes, planes, 3, 1, 1)?,
            bn2: BatchNorm::new(vb.pp("bn2"), planes)?,
            shortcut: Shortcut::new(vb, layout, c_in, planes, stride)?,
        })
    }

    /// Inference mode: `forward_t(x, false)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// Training (`train`) or inference mode; see the module docs.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = conv_bn(&self.conv1, &self.bn1, x, train, Then::Relu)?;
        let shortcut = Shortcut::forward_t(&self.shortcut, x, train)?;
        conv_bn(
            &self.conv2,
            &self.bn2,
            &out,
            train,
            Then::AddRelu(&shortcut),
        )
    }
}

/// 1x1 reduce to `planes`, 3x3 (stride here, as torchvision >= 0.3 and robustness do), 1x1 expand to
/// `4 * planes`, plus shortcut. The inner width is `planes` (torchvision with groups=1, base_width=64).
#[derive(Debug, Clone)]
pub struct Bottleneck {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    conv3: Conv,
    bn3: BatchNorm,
    shortcut: Option<Shortcut>,
}

impl Bottleneck {
    fn new(
        vb: VarBuilder,
        layout: Layout,
        c_in: usize,
        planes: usize,
        stride: usize,
    ) -> Result<Self> {
        let c_out = planes * BlockKind::Bottleneck.expansion();
        Ok(Self {
            conv1: Conv::new(vb.pp("conv1"), layout, c_in, planes, 1, 1, 0)?,
            bn1: BatchNorm::new(vb.pp("bn1"), planes)?,
            conv2: Conv::new(vb.pp("conv2"), layout, planes, planes, 3, stride, 1)?,
            bn2: BatchNorm::new(vb.pp("bn2"), planes)?,
            conv3: Conv::new(vb.pp("conv3"), layout, planes, c_out, 1, 1, 0)?,
            bn3: BatchNorm::new(vb.pp("bn3"), c_out)?,
            shortcut: Shortcut::new(vb, layout, c_in, c_out, stride)?,
        })
    }

    /// Inference mode: `forward_t(x, false)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// Training (`train`) or inference mode; see the module docs.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = conv_bn(&self.conv1, &self.bn1, x, train, Then::Relu)?;
        let out = conv_bn(&self.conv2, &self.bn2, &out, train, Then::Relu)?;
        let shortcut = Shortcut::forward_t(&self.shortcut, x, train)?;
        conv_bn(
            &self.conv3,
            &self.bn3,
            &out,
            train,
            Then::AddRelu(&shortcut),
        )
    }
}

#[derive(Debug, Clone)]
enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Block::Basic(b) => b.forward_t(x, train),
            Block::Bottleneck(b) => b.forward_t(x, train),
        }
    }
}

/// The final linear layer, `x W^T + b` (candle_nn::Linear's arithmetic), constant in inference mode.
#[derive(Debug, Clone)]
struct Head {
    weight: Tensor,
    bias: Tensor,
}

impl Head {
    /// PyTorch's default `nn.Linear` initialization (neither robustness nor torchvision changes it).
    fn new(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((c_out, c_in), "weight", torch_default_init(c_in))?,
            bias: vb.get_with_hints(c_out, "bias", torch_default_init(c_in))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (weight, bias) = if train {
            (self.weight.clone(), self.bias.clone())
        } else {
            (self.weight.detach(), self.bias.detach())
        };
        x.matmul(&weight.t()?)?.broadcast_add(&bias)
    }
}

/// A ResNet classifier taking pixels in [0, 1]: robustness' `InputNormalize` (clamp, then
/// `(x - mean) / std`), the network, logits.
#[derive(Debug, Clone)]
pub struct ResNet {
    cfg: ResNetConfig,
    conv1: Conv,
    bn1: BatchNorm,
    /// `layers[stage][block]`.
    layers: Vec<Vec<Block>>,
    head: Head,
    mean: Tensor,
    std: Tensor,
}

impl ResNet {
    /// Builds the network from `vb`, whose keys are the original state dict's without wrapper
    /// prefixes (see the module docs). The model's dtype and device are `vb`'s.
    ///
    /// With a `VarBuilder` over a `candle_nn::VarMap` (of `vb`'s dtype), the model uses the map's
    /// `Var`s and creates missing ones initialized as PyTorch does: convolutions uniform in
    /// `+-1/sqrt(fan_in)` (CIFAR layout: robustness keeps the default) or `kaiming_normal_(fan_out)`
    /// (ImageNet layout, torchvision), batch norm weight 1, bias 0, running mean 0, variance 1, and the
    /// head uniform in `+-1/sqrt(fan_in)`. Use [`is_buffer`] to keep the running statistics away from
    /// the optimizer.
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.widths.contains(&0) || cfg.blocks.contains(&0) || cfg.num_classes == 0 {
            bail!("ResNet config has a zero width, block count or class count: {cfg:?}")
        }
        let conv1 = match cfg.layout {
            Layout::Cifar => Conv::new(vb.pp("conv1"), cfg.layout, 3, cfg.widths[0], 3, 1, 1)?,
            Layout::Imagenet => Conv::new(vb.pp("conv1"), cfg.layout, 3, cfg.widths[0], 7, 2, 3)?,
        };
        let bn1 = BatchNorm::new(vb.pp("bn1"), cfg.widths[0])?;
        let expansion = cfg.block.expansion();
        let mut c_in = cfg.widths[0];
        let mut layers = Vec::with_capacity(4);
        for (stage, (&n_blocks, &planes)) in cfg.blocks.iter().zip(&cfg.widths).enumerate() {
            let vb_stage = vb.pp(format!("layer{}", stage + 1));
            let mut blocks = Vec::with_capacity(n_blocks);
            for i in 0..n_blocks {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let vb_block = vb_stage.pp(i.to_string());
                blocks.push(match cfg.block {
                    BlockKind::Basic => {
                        Block::Basic(BasicBlock::new(vb_block, cfg.layout, c_in, planes, stride)?)
                    }
                    BlockKind::Bottleneck => Block::Bottleneck(Bottleneck::new(
                        vb_block, cfg.layout, c_in, planes, stride,
                    )?),
                });
                c_in = planes * expansion;
            }
            layers.push(blocks);
        }
        let head_name = match cfg.layout {
            Layout::Cifar => "linear",
            Layout::Imagenet => "fc",
        };
        let head = Head::new(vb.pp(head_name), cfg.feature_dim(), cfg.num_classes)?;
        let channel_stat = |v: [f32; 3]| -> Result<Tensor> {
            Tensor::new(&v, vb.device())?
                .to_dtype(vb.dtype())?
                .reshape((1, 3, 1, 1))
        };
        Ok(Self {
            cfg: cfg.clone(),
            conv1,
            bn1,
            layers,
            head,
            mean: channel_stat(cfg.mean)?,
            std: channel_stat(cfg.std)?,
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// robustness' `InputNormalize`: clamp pixels to [0, 1] (with PyTorch's clamp gradient: none at
    /// pixels exactly 0 or 1), then
    /// `(x - mean) / std` per channel.
    pub fn normalize(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != 3 {
            bail!("ResNet expects images of shape (N, 3, H, W), got {dims:?}")
        }
        if x.dtype() != self.mean.dtype() {
            bail!(
                "ResNet input dtype {:?} differs from the model's {:?}",
                x.dtype(),
                self.mean.dtype()
            )
        }
        ops::clamp_with_torch_grad(x, 0.0, 1.0)?
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)
    }

    /// Pre-head features `(N, feature_dim)` of pixels `x` in [0, 1], shape `(N, 3, H, W)`, in inference
    /// mode.
    pub fn forward_features(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_features_t(x, false)
    }

    /// Pre-head features in training (`train`) or inference mode; see the module docs.
    pub fn forward_features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut x = conv_bn(
            &self.conv1,
            &self.bn1,
            &self.normalize(x)?,
            train,
            Then::Relu,
        )?;
        if self.cfg.layout == Layout::Imagenet {
            x = ops::max_pool2d(&x, 3, 2, 1)?;
        }
        for block in self.layers.iter().flatten() {
            x = block.forward_t(&x, train)?;
        }
        match self.cfg.layout {
            Layout::Cifar => {
                // robustness pools with avg_pool2d(4) and feeds the flattened result to a head sized for
                // one position: only a 4x4 final map (25..32 pixel inputs) is meaningful.
                let (_, _, fh, fw) = x.dims4()?;
                if (fh, fw) != (4, 4) {
                    bail!("CIFAR-layout ResNet needs inputs whose final feature map is 4x4 (e.g. 32x32); {h}x{w} gives {fh}x{fw}")
                }
                x.avg_pool2d(4)?.flatten_from(1)
            }
            Layout::Imagenet => x.flatten_from(2)?.mean(2),
        }
    }

    /// Logits `(N, num_classes)` of pixels `x` in [0, 1], shape `(N, 3, H, W)`, in inference mode
    /// (PyTorch's `eval()`): running statistics, constant weights, gradients for `x` only.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// Logits in training mode (`train`, PyTorch's `train()`: batch statistics, running statistics
    /// updated in place, gradients for every weight and `x`) or inference mode (`!train`, as
    /// [`ResNet::forward`]).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.head
            .forward_t(&self.forward_features_t(x, train)?, train)
    }

    /// The model's dtype (that of its parameters).
    pub fn dtype(&self) -> DType {
        self.mean.dtype()
    }
}

impl Module for ResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ResNet::forward(self, x)
    }
}
