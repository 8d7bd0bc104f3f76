//! Elementwise loops of the CPU ops, written so that the compiler vectorizes them, and run with
//! AVX2 when the CPU has it (the binary itself targets baseline x86-64, so that it runs anywhere;
//! gemm dispatches the same way).

use std::iter::Sum;

/// f32 and f64, the dtypes the CPU kernels handle.
pub(crate) trait CpuFloat: candle_core::WithDType + Default + std::ops::AddAssign {
    fn relu(self) -> Self {
        if self > Self::zero() {
            self
        } else {
            Self::zero()
        }
    }
}
impl CpuFloat for f32 {}
impl CpuFloat for f64 {}

/// Whether this CPU has AVX2 and FMA (the features the vectorized kernels are compiled for).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `e^x` in f32 without a libm call, so that a loop of it vectorizes: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, a degree-6 polynomial for `e^r` (the Cephes `expf` coefficients), and `2^n` put
/// into the exponent bits. Within 2 ulp of `f32::exp` on `[-87, 88]`; inputs beyond are clamped
/// (`e^-87` ~ 1.6e-38, `e^88` ~ 1.7e38).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer (to nearest) and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e_r = p * r * r + r + 1.0;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    e_r * f32::from_bits(((n_bits + 127) << 23) as u32)
}

/// `x * sigmoid(x)` with [`exp_f32`].
#[inline(always)]
pub(crate) fn silu_f32(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

/// Lanes of the row reductions: a floating-point sum only vectorizes when written as independent
/// partial sums (the compiler may not reorder additions).
pub(crate) const LANES: usize = 8;

/// `sum term(x_i)` in [`LANES`] interleaved partial sums: [`lane_sum_zip`] over one slice.
#[inline(always)]
pub(crate) fn lane_sum<T: Copy, A: CpuFloat + Sum>(x: &[T], term: impl Fn(T) -> A) -> A {
    lane_sum_zip(x, x, |v, _| term(v))
}

/// `sum term(a_i, b_i)` over the first `min(a.len(), b.len())` pairs, accumulated in `A`: lane `j`
/// sums the terms at `8k + j` in order, then the lanes are added in order and the tail (the last
/// `len % 8` terms, summed in order) after them. One running sum would be a chain of dependent
/// additions; eight lanes are one vector register of f32 (two of f64).
#[inline(always)]
pub(crate) fn lane_sum_zip<T: Copy, U: Copy, A: CpuFloat + Sum>(a: &[T], b: &[U], term: impl Fn(T, U) -> A) -> A {
    let len = a.len().min(b.len());
    let (a, b) = (a[..len].chunks_exact(LANES), b[..len].chunks_exact(LANES));
    let tail = a.remainder().iter().zip(b.remainder()).map(|(&u, &v)| term(u, v)).sum::<A>();
    let mut lanes = [A::default(); LANES];
    for (a, b) in a.zip(b) {
        for ((lane, &u), &v) in lanes.iter_mut().zip(a).zip(b) {
            *lane += term(u, v);
        }
    }
    lanes.iter().copied().sum::<A>() + tail
}

/// Calls `$body` (an expression) compiled twice: with AVX2 and FMA enabled when the CPU has them,
/// else for the baseline target. `$name` names the AVX2 copy (a local function of the given
/// arguments, returning `$ret`, unit if left out).
macro_rules! with_avx2 {
    ($name:ident, ($($arg:ident: $ty:ty),*), $body:expr) => {
        with_avx2!($name, ($($arg: $ty),*) -> (), $body)
    };
    ($name:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty, $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            fn $name($($arg: $ty),*) -> $ret { $body }
            if $crate::vector::has_avx2_fma() {
                // SAFETY: the features the function was compiled for are present.
                unsafe { $name($($arg),*) }
            } else {
                (|| $body)()
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            (|| $body)()
        }
    }};
}
pub(crate) use with_avx2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (fast, exact) = (exp_f32(x), (x as f64).exp() as f32);
            worst = worst.max(fast.to_bits().abs_diff(exact.to_bits()));
            x += 0.0137;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) > 0.0 && exp_f32(1000.0).is_finite());
    }

    /// The lane sums add in the order their doc states (callers' results depend on it bit for
    /// bit), on values of mixed magnitude where another order rounds differently, for lengths with
    /// no lanes, lanes and a tail, and lanes only.
    #[test]
    fn lane_sums_add_in_the_documented_order() {
        for len in [0, 3, 8, 13, 24, 37] {
            let a: Vec<f32> = (0..len).map(|i| ((i * 7919 % 23) as f32 - 11.0) * 10f32.powi(i as i32 % 9 - 4)).collect();
            let b: Vec<f32> = (0..len).map(|i| ((i * 104_729 % 17) as f32 - 8.0) * 0.37).collect();
            let full = len / LANES * LANES;
            let mut lanes = [0f32; LANES];
            for (i, (u, v)) in a[..full].iter().zip(&b).enumerate() {
                lanes[i % LANES] += u * v;
            }
            let mut expected = -0.0f32;
            for lane in lanes {
                expected += lane;
            }
            let mut tail = -0.0f32;
            for (u, v) in a[full..].iter().zip(&b[full..]) {
                tail += u * v;
            }
            expected += tail;
            assert_eq!(lane_sum_zip(&a, &b, |u, v| u * v).to_bits(), expected.to_bits(), "length {len}");
            let sum = lane_sum(&a, |u| u as f64);
            let expected: f64 = lane_sum_zip(&a, &a, |u, _| u as f64);
            assert_eq!(sum.to_bits(), expected.to_bits(), "length {len}");
        }
    }

    #[test]
    fn silu_matches_the_definition() {
        for x in [-90.0f32, -20.0, -3.5, -0.1, 0.0, 0.7, 4.0, 30.0, 100.0] {
            let exact = x as f64 / (1.0 + (-(x as f64)).exp());
            let fast = silu_f32(x) as f64;
            assert!((fast - exact).abs() <= 1e-6 * exact.abs().max(1e-30) + 1e-30, "silu({x}): {fast} vs {exact}");
        }
    }
}
