// One AdamW update and one EMA update of one parameter tensor, f32 on CUDA (see
// models/src/optimizer_step.rs). Composed from candle ops an AdamW update is twelve kernels and an
// EMA update three, for every parameter tensor, every iteration: small launches that a training
// step of a 7 M-parameter UNet (245 tensors) spends thousands of.
//
// Every operation is IEEE-rounded on its own, in the composed version's order (the _rn intrinsics
// keep nvcc from contracting a multiply and an add into one FMA), so the results equal the
// composed ones exactly: candle's affine `x * mul + add` is one rounding when add is 0 or mul is 1,
// and its sqrt and division are IEEE's.

// `out` holds the new parameter, exp_avg and exp_avg_sq one after the other, numel each.
// s: decay (1 - lr wd), beta1, 1 - beta1, beta2, 1 - beta2, 1 / sqrt(1 - beta2^t), eps,
// lr / (1 - beta1^t), each rounded to f32 as candle does.
extern "C" __global__ void adamw_f32(const float* __restrict__ p, const float* __restrict__ g,
                                     const float* __restrict__ m, const float* __restrict__ v,
                                     float* __restrict__ out, unsigned int numel, float decay, float beta1,
                                     float one_minus_beta1, float beta2, float one_minus_beta2,
                                     float inv_sqrt_bias2, float eps, float lr_over_bias1) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += blockDim.x * gridDim.x) {
        const float gi = g[i];
        const float decayed = __fmul_rn(p[i], decay);
        const float m1 = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(gi, one_minus_beta1));
        const float v1 = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), one_minus_beta2));
        const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v1), inv_sqrt_bias2), eps);
        out[i] = __fsub_rn(decayed, __fmul_rn(__fdiv_rn(m1, denom), lr_over_bias1));
        out[numel + i] = m1;
        out[2 * numel + i] = v1;
    }
}

// ema * rate + p * (1 - rate).
extern "C" __global__ void ema_f32(const float* __restrict__ ema, const float* __restrict__ p, float* __restrict__ out,
                                   unsigned int numel, float rate, float one_minus_rate) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += blockDim.x * gridDim.x) {
        out[i] = __fadd_rn(__fmul_rn(ema[i], rate), __fmul_rn(p[i], one_minus_rate));
    }
}
