//! The f32 3x3, stride-1, padding-1 convolutions of one sample that the CPU ops run without
//! im2col: Winograd's F(2x2, 3x3) ([`crate::winograd`]) where the layer has 128 or more channels
//! each way on a map of 8x8 or more, else the direct kernel ([`crate::direct_conv`]) where it takes
//! the shape.
//!
//! On one core of this project's 2-core EPYC, over batches of 16 distinct samples
//! (`winograd::timing`, an ignored test): Winograd did 138-170 GFLOP/s of the direct convolution's
//! multiply-adds on 128-512 channels at 8x8 to 32x32, 1.44-1.83x the direct kernel; with 64
//! channels it lost (0.82-0.91x), and on 4x4 maps its 4 tiles leave gemm too little (33-43 GFLOP/s).

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{DType, WithDType};

use crate::conv::Geometry;
use crate::{direct_conv, winograd};

/// A layer's kernel, prepared for the convolution that does it.
pub(crate) enum Conv3x3 {
    /// Packed for [`direct_conv::conv3x3`].
    Direct(Vec<f32>),
    /// Transformed for [`winograd::conv3x3`].
    Winograd(Vec<f32>),
}

/// One thread's buffers for [`Conv3x3::run`].
#[derive(Default)]
struct Scratch {
    padded: Vec<f32>,
    winograd: winograd::Scratch,
}

thread_local! {
    /// Kept from op to op: allocated per op, Winograd's buffers (4x the sample's input and output)
    /// came as fresh pages each time, and zeroing them took 9% of the guided sampling step.
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Whether Winograd does a layer of `c_in -> c_out` channels on an `h x w` map.
fn winograd_wins(c_in: usize, c_out: usize, h: usize, w: usize) -> bool {
    winograd::supports(h, w) && h.min(w) >= 8 && c_in.min(c_out) >= 128
}

impl Conv3x3 {
    /// The prepared kernel when a convolution of geometry `g` with this `weight` runs here: f32, 3x3,
    /// stride 1, padding 1, and a shape one of the two kernels takes (else im2col + gemm does it).
    pub(crate) fn plan<T: WithDType>(g: &Geometry, weight: &[T]) -> Option<Self> {
        let square = |a: &crate::conv::AxisGeometry| a.k == 3 && a.stride == 1 && a.padding == 1;
        if !(square(&g.rows) && square(&g.cols)) {
            return None;
        }
        let weight = as_f32(weight)?;
        let (c_in, c_out, h, w) = (g.c_in, g.c_out, g.rows.n, g.cols.n);
        if winograd_wins(c_in, c_out, h, w) {
            Some(Conv3x3::Winograd(winograd::transform_kernel(weight, c_out, c_in)))
        } else if direct_conv::supports(c_out, h, w) {
            Some(Conv3x3::Direct(direct_conv::pack_weight(weight, c_out, c_in)))
        } else {
            None
        }
    }

    /// `y = conv2d(x, weight, stride 1, padding 1)` for one sample of the planned geometry: `x`
    /// `[c_in, h, w]`, `y` `[c_out, h, w]` (overwritten); `threads` is gemm's parallelism.
    pub(crate) fn run<T: WithDType>(
        &self,
        x: &[T],
        y: &mut [MaybeUninit<T>],
        shape: (usize, usize, usize, usize),
        threads: gemm::Parallelism,
    ) {
        let x = as_f32(x).expect("a planned 3x3 convolution is f32");
        assert_eq!(T::DTYPE, DType::F32);
        // SAFETY: T is f32 (checked just above).
        let y = unsafe { &mut *(y as *mut [MaybeUninit<T>] as *mut [MaybeUninit<f32>]) };
        SCRATCH.with_borrow_mut(|scratch| match self {
            Conv3x3::Direct(packed) => direct_conv::conv3x3(x, packed, y, &mut scratch.padded, shape),
            Conv3x3::Winograd(kernel) => winograd::conv3x3(x, kernel, y, &mut scratch.winograd, shape, threads),
        })
    }
}

/// `s` as f32 when `T` is f32.
fn as_f32<T: WithDType>(s: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 itself.
    (T::DTYPE == DType::F32).then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) })
}
