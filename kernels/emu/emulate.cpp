// Every kernel family executed on the host (cuda_emu.h) against a plain reference written from
// the format and op definitions, on awkward sizes: partial tiles, partial warps, GQA, block
// tables out of order, ties. `cargo xtask emulate-kernels` builds and runs this; it reports every
// mismatch and exits 1 if there was one. The GPU tests (`cargo xtask test-gpu`) compare the same
// kernels with the CPU kernels on real hardware; this checks the kernels' logic everywhere.
#include "../activation.cu"
#include "../attention.cu"
#include "../elementwise.cu"
#include "../embedding.cu"
#include "../gemm_8bit.cu"
#include "../lora.cu"
#include "../norm.cu"
#include "../rope.cu"
#include "../softmax.cu"
#include "../weight_only.cu"

#include <chrono>
#include <cstdio>
#include <random>
#include <string>

namespace {

int failures = 0;

std::vector<float> rand_vec(size_t n, unsigned seed, float lo = -1.0f, float hi = 1.0f) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

std::vector<uint8_t> rand_bytes(size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> v(n);
    for (auto& x : v) x = (uint8_t)(rng() & 0xff);
    return v;
}

// |got − want| ≤ tol · (1 + |want|) everywhere; reports the first miss.
void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    for (size_t i = 0; i < want.size(); ++i) {
        if (!(std::fabs(got[i] - want[i]) <= tol * (1.0 + std::fabs(want[i])))) {
            std::printf("FAIL %s[%zu]: got %.9g want %.9g\n", what.c_str(), i, got[i], want[i]);
            ++failures;
            return;
        }
    }
    std::printf("ok   %s\n", what.c_str());
}

template <typename T>
void check_eq(const std::string& what, const std::vector<T>& got, const std::vector<T>& want) {
    for (size_t i = 0; i < want.size(); ++i) {
        if (!(got[i] == want[i])) {
            std::printf("FAIL %s[%zu]: got %g want %g\n", what.c_str(), i, (double)got[i], (double)want[i]);
            ++failures;
            return;
        }
    }
    std::printf("ok   %s\n", what.c_str());
}

emu::Dim dim(unsigned x, unsigned y = 1) { return {x, y, 1}; }

void norms() {
    const int rows = 3, cols = 333;  // 333: partial warps in a 256-thread block
    auto x = rand_vec(rows * cols, 1), r = rand_vec(rows * cols, 2), w = rand_vec(cols, 3), b = rand_vec(cols, 4);
    const float eps = 1e-5f;
    auto rms = [&](const std::vector<float>& in) {
        std::vector<double> out(in.size());
        for (int i = 0; i < rows; ++i) {
            double ss = 0;
            for (int c = 0; c < cols; ++c) ss += (double)in[i * cols + c] * in[i * cols + c];
            const double inv = 1.0 / std::sqrt(ss / cols + eps);
            for (int c = 0; c < cols; ++c) out[i * cols + c] = in[i * cols + c] * inv * w[c];
        }
        return out;
    };
    auto ln = [&](const std::vector<float>& in) {
        std::vector<double> out(in.size());
        for (int i = 0; i < rows; ++i) {
            double mean = 0, var = 0;
            for (int c = 0; c < cols; ++c) mean += in[i * cols + c];
            mean /= cols;
            for (int c = 0; c < cols; ++c) var += (in[i * cols + c] - mean) * (in[i * cols + c] - mean);
            const double inv = 1.0 / std::sqrt(var / cols + eps);
            for (int c = 0; c < cols; ++c) out[i * cols + c] = (in[i * cols + c] - mean) * inv * w[c] + b[c];
        }
        return out;
    };
    std::vector<float> out(rows * cols), sum(rows * cols);
    for (int i = 0; i < rows * cols; ++i) sum[i] = x[i] + r[i];
    emu::launch(dim(rows), dim(256), [&] { rms_norm_f32(x.data(), w.data(), out.data(), cols, eps); });
    check("rms_norm", out, rms(x), 1e-5);
    auto res = r;
    emu::launch(dim(rows), dim(256), [&] { add_rms_norm_f32(x.data(), res.data(), w.data(), out.data(), cols, eps); });
    check("add_rms_norm", out, rms(sum), 1e-5);
    check_eq("add_rms_norm residual", res, sum);
    emu::launch(dim(rows), dim(256), [&] { layer_norm_f32(x.data(), w.data(), b.data(), out.data(), cols, eps); });
    check("layer_norm", out, ln(x), 1e-5);
    res = r;
    emu::launch(dim(rows), dim(256),
                [&] { add_layer_norm_f32(x.data(), res.data(), w.data(), b.data(), out.data(), cols, eps); });
    check("add_layer_norm", out, ln(sum), 1e-5);
}

void pointwise() {
    const int rows = 2, cols = 300;
    auto x = rand_vec(rows * cols, 5, -4.0f, 4.0f);
    std::vector<double> want(x.size());
    auto y = x;
    emu::launch(dim(rows), dim(128), [&] { softmax_f32(y.data(), cols); });
    for (int i = 0; i < rows; ++i) {
        double m = -INFINITY, s = 0;
        for (int c = 0; c < cols; ++c) m = std::max(m, (double)x[i * cols + c]);
        for (int c = 0; c < cols; ++c) s += std::exp(x[i * cols + c] - m);
        for (int c = 0; c < cols; ++c) want[i * cols + c] = std::exp(x[i * cols + c] - m) / s;
    }
    check("softmax", y, want, 1e-6);

    const int inter = cols / 2;
    std::vector<float> act(rows * inter);
    emu::launch(dim(2), dim(64), [&] { silu_mul_f32(x.data(), act.data(), rows, inter); });
    std::vector<double> want_act(rows * inter);
    for (int i = 0; i < rows; ++i)
        for (int c = 0; c < inter; ++c) {
            const double g = x[i * cols + c], u = x[i * cols + inter + c];
            want_act[i * inter + c] = g / (1.0 + std::exp(-g)) * u;
        }
    check("silu_mul", act, want_act, 1e-6);
    emu::launch(dim(2), dim(64), [&] { gelu_tanh_mul_f32(x.data(), act.data(), rows, inter); });
    for (int i = 0; i < rows; ++i)
        for (int c = 0; c < inter; ++c) {
            const double g = x[i * cols + c], u = x[i * cols + inter + c];
            want_act[i * inter + c] = 0.5 * g * (1.0 + std::tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))) * u;
        }
    check("gelu_tanh_mul", act, want_act, 1e-6);

    // One expert's outputs (3 rows of `inter`) added, weighted, to rows 4, 0, 2 of 5.
    const std::vector<unsigned> moe_rows = {4, 0, 2};
    const std::vector<float> moe_w = {0.25f, 0.5f, 2.0f};
    auto moe_out = rand_vec(5 * inter, 7);
    std::vector<double> want_moe(moe_out.begin(), moe_out.end());
    for (int i = 0; i < 3; ++i)
        for (int c = 0; c < inter; ++c) want_moe[moe_rows[i] * inter + c] += (double)moe_w[i] * x[i * inter + c];
    emu::launch(dim(3), dim(64), [&] {
        add_rows_scaled_f32(x.data(), moe_rows.data(), moe_w.data(), moe_out.data(), 3, inter);
    });
    check("add_rows_scaled", moe_out, want_moe, 1e-6);

    // RoPE: position 4000 at head_dim 64, rotate-half pairs; tokens 2 and 3 rotate by a second
    // frequency set (a sequence past LongRoPE's original context), cos and sin scaled.
    const int heads = 3, hd = 64, half = hd / 2;
    const float rope_scale = 1.25f;
    std::vector<int> pos = {0, 1, 17, 4000};
    std::vector<unsigned> sets = {0, 0, 1, 1};
    std::vector<float> inv_freq(2 * half);
    for (int j = 0; j < half; ++j) {
        inv_freq[j] = (float)std::pow(10000.0, -2.0 * j / hd);
        inv_freq[half + j] = inv_freq[j] / (1.0f + j);
    }
    auto q = rand_vec(pos.size() * heads * hd, 6);
    auto rq = q;
    emu::launch(dim(pos.size(), heads), dim(32), [&] {
        rope_f32(rq.data(), pos.data(), sets.data(), inv_freq.data(), heads, hd, half, rope_scale);
    });
    std::vector<double> want_q(q.size());
    for (size_t t = 0; t < pos.size(); ++t)
        for (int h = 0; h < heads; ++h)
            for (int j = 0; j < half; ++j) {
                const size_t o = (t * heads + h) * hd;
                const double a = (double)((float)pos[t] * inv_freq[sets[t] * half + j]);
                const double c = (double)((float)std::cos(a) * rope_scale);
                const double s = (double)((float)std::sin(a) * rope_scale);
                want_q[o + j] = q[o + j] * c - q[o + j + half] * s;
                want_q[o + j + half] = q[o + j + half] * c + q[o + j] * s;
            }
    check("rope", rq, want_q, 1e-6);

    // bf16 round trip: within half a bf16 step, and exact on representable values.
    std::vector<unsigned short> h(x.size());
    emu::launch(dim(2), dim(256), [&] { f32_to_bf16(x.data(), h.data(), (int)x.size()); });
    std::vector<float> back(3 * cols);
    std::vector<unsigned> ids = {3, 0, 1};
    emu::launch(dim(3), dim(64), [&] { embedding_bf16(h.data(), ids.data(), back.data(), rows, cols); });
    std::vector<double> want_e(3 * cols);
    for (int t = 0; t < 3; ++t)
        for (int c = 0; c < cols; ++c) want_e[t * cols + c] = ids[t] < (unsigned)rows ? x[ids[t] * cols + c] : 0.0;
    check("f32_to_bf16 + embedding_bf16 (id 3 out of range)", back, want_e, 1.0 / 256);
    emu::launch(dim(2), dim(256), [&] { f32_to_f16(x.data(), h.data(), (int)x.size()); });
    emu::launch(dim(3), dim(64), [&] { embedding_f16(h.data(), ids.data(), back.data(), rows, cols); });
    check("f32_to_f16 + embedding_f16", back, want_e, 1.0 / 2048);
}

// y = x · Wᵀ + bias with W given as dense values.
std::vector<double> ref_linear(const std::vector<float>& x, const std::vector<double>& w, const std::vector<float>& bias,
                               int m, int n, int k) {
    std::vector<double> y(m * n);
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
            double s = bias[j];
            for (int c = 0; c < k; ++c) s += (double)x[i * k + c] * w[(size_t)j * k + c];
            y[i * n + j] = s;
        }
    return y;
}

void weight_only() {
    const int n = 75, k = 160, group = 64, groups = (k + group - 1) / group;  // partial last group
    auto bias = rand_vec(n, 10);
    auto q8 = rand_bytes(n * k, 11);
    auto s = rand_vec(n * groups, 12, 0.01f, 0.03f);
    auto off = rand_vec(n * groups, 13);
    auto q4 = rand_bytes(n * k / 2, 14);
    auto qf = rand_bytes(n * k, 15);
    for (auto& b : qf) if ((b & 0x7f) == 0x7f) b = 0x7e;
    auto sf = rand_vec(n, 16, 0.01f, 0.03f);
    auto bs = rand_bytes(n * k / 16, 17);
    for (auto& b : bs) b = 0x30 + b % 0x20;
    auto hw = rand_bytes(2 * n * k, 18);
    auto f32 = rand_vec(n * k, 19);
    std::vector<unsigned short> bf(n * k), f16(n * k);
    for (int i = 0; i < n * k; ++i) {
        bf[i] = (unsigned short)(hw[2 * i] | (hw[2 * i + 1] & 0x3f) << 8);  // |v| < 2
        f16[i] = (unsigned short)(hw[2 * i] | (hw[2 * i + 1] & 0xbb) << 8);
    }
    // Dense values from the formats' definitions.
    std::vector<double> w8(n * k), w8z(n * k), w4(n * k), w4s(n * k), wf(n * k), wn(n * k), wb(n * k),
        wh(n * k), wd(f32.begin(), f32.end());
    for (int r = 0; r < n; ++r)
        for (int c = 0; c < k; ++c) {
            const int i = r * k + c, g = r * groups + c / group;
            w8[i] = (double)(signed char)q8[i] * s[g];
            w8z[i] = w8[i] + off[g];
            const int blk = (r * k + c) / 32, in = c % 32;
            const uint8_t byte = q4[blk * 16 + in % 16];
            const int code = in < 16 ? byte & 0xf : byte >> 4;
            w4[i] = (double)s[g] * code + off[g];
            w4s[i] = (double)s[g] * (code - 8);
            wf[i] = (double)e4m3_to_f32(qf[i]) * sf[r];
            const int b16 = (r * k + c) / 16, in16 = c % 16;
            const uint8_t nb = q4[b16 * 8 + in16 % 8];
            wn[i] = (double)e2m1_to_f32(in16 < 8 ? nb & 0xf : nb >> 4) * e4m3_to_f32(bs[b16]) * 0.7;
            wb[i] = bf16_to_f32(bf[i]);
            wh[i] = cvt_f32_f16(f16[i]);
        }
    const auto* q8p = reinterpret_cast<const signed char*>(q8.data());
    for (int m : {1, 5, 70}) {  // 5: the GEMV's second row group; 70: partial 64-row tiles
        auto x = rand_vec(m * k, 20 + m);
        std::vector<float> y(m * n);
        // Batch-invariant mode takes the matrix-vector kernels at every row count.
        auto run_as = [&](bool gemv, const char* name, const std::vector<double>& w, auto gemv_k,
                          auto gemm_k) {
            std::fill(y.begin(), y.end(), NAN);
            if (gemv) emu::launch(dim((n + 3) / 4), dim(128), gemv_k);
            else emu::launch(dim((n + 63) / 64, (m + 63) / 64), dim(256), gemm_k);
            const char* path = gemv ? " gemv" : " gemm";
            check(std::string(name) + path + " m=" + std::to_string(m), y, ref_linear(x, w, bias, m, n, k), 1e-4);
        };
        auto run = [&](const char* name, const std::vector<double>& w, auto gemv_k, auto gemm_k) {
            run_as(m <= 8, name, w, gemv_k, gemm_k);
            if (m > 8) run_as(true, name, w, gemv_k, gemm_k);
        };
        const float* xp = x.data();
        const float* bp = bias.data();
        float* yp = y.data();
        run("int8", w8, [&] { gemv_int8(q8p, s.data(), nullptr, group, xp, bp, yp, m, n, k); },
            [&] { gemm_int8(q8p, s.data(), nullptr, group, xp, bp, yp, m, n, k); });
        run("int8 zp", w8z, [&] { gemv_int8(q8p, s.data(), off.data(), group, xp, bp, yp, m, n, k); },
            [&] { gemm_int8(q8p, s.data(), off.data(), group, xp, bp, yp, m, n, k); });
        run("int4 zp", w4, [&] { gemv_int4(q4.data(), s.data(), off.data(), group, xp, bp, yp, m, n, k); },
            [&] { gemm_int4(q4.data(), s.data(), off.data(), group, xp, bp, yp, m, n, k); });
        run("int4 sym", w4s, [&] { gemv_int4(q4.data(), s.data(), nullptr, group, xp, bp, yp, m, n, k); },
            [&] { gemm_int4(q4.data(), s.data(), nullptr, group, xp, bp, yp, m, n, k); });
        run("fp8", wf, [&] { gemv_fp8(qf.data(), sf.data(), xp, bp, yp, m, n, k); },
            [&] { gemm_fp8(qf.data(), sf.data(), xp, bp, yp, m, n, k); });
        run("nvfp4", wn, [&] { gemv_nvfp4(q4.data(), bs.data(), 0.7f, xp, bp, yp, m, n, k); },
            [&] { gemm_nvfp4(q4.data(), bs.data(), 0.7f, xp, bp, yp, m, n, k); });
        // Dense rows have no tiled kernel here (cuBLAS takes larger batches).
        run_as(true, "bf16", wb, [&] { gemv_bf16(bf.data(), xp, bp, yp, m, n, k); }, [] {});
        run_as(true, "f16", wh, [&] { gemv_f16(f16.data(), xp, bp, yp, m, n, k); }, [] {});
        run_as(true, "f32", wd, [&] { gemv_f32(f32.data(), xp, bp, yp, m, n, k); }, [] {});
    }
}

void eight_bit() {
    const int n = 75, k = 192;
    auto bias = rand_vec(n, 30);
    auto wq = rand_bytes(n * k, 31);
    for (auto& b : wq) if (b == 0x80) b = 0x81;  // int8 weights are symmetric: −127..127
    auto ws = rand_vec(n, 32, 0.001f, 0.01f);
    const auto* wqs = reinterpret_cast<const signed char*>(wq.data());
    for (int m : {1, 7, 9, 70}) {
        auto x = rand_vec(m * k, 33 + m);
        std::fill(x.begin(), x.begin() + k, 0.0f);  // an all-zero row: scale 1, codes 0
        // The CPU's W8A8 arithmetic, step for step.
        std::vector<signed char> xq(m * k);
        std::vector<float> xs(m), y(m * n);
        std::vector<float> want(m * n);
        std::vector<signed char> want_q(m * k);
        std::vector<float> want_s(m);
        for (int i = 0; i < m; ++i) {
            float amax = 0;
            for (int c = 0; c < k; ++c) amax = std::max(amax, std::fabs(x[i * k + c]));
            const float sc = amax > 0 ? amax / 127.0f : 1.0f, inv = 1.0f / sc;
            want_s[i] = sc;
            for (int c = 0; c < k; ++c)
                want_q[i * k + c] = (signed char)std::clamp(std::round(x[i * k + c] * inv), -127.0f, 127.0f);
        }
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < n; ++j) {
                int d = 0;
                for (int c = 0; c < k; ++c) d += want_q[i * k + c] * wqs[j * k + c];
                want[i * n + j] = (float)d * want_s[i] * ws[j] + bias[j];
            }
        emu::launch(dim(m), dim(256), [&] { quantize_rows_int8(x.data(), xq.data(), xs.data(), k); });
        const std::string tag = " m=" + std::to_string(m);
        check_eq("quantize_rows_int8 codes" + tag, xq, want_q);
        check_eq("quantize_rows_int8 scales" + tag, xs, want_s);
        std::fill(y.begin(), y.end(), NAN);
        if (m <= 8)
            emu::launch(dim((n + 3) / 4), dim(128),
                        [&] { gemv_w8a8(xq.data(), xs.data(), wqs, ws.data(), bias.data(), y.data(), m, n, k); });
        else
            emu::launch(dim((n + 63) / 64, (m + 63) / 64), dim(128),
                        [&] { gemm_w8a8(xq.data(), xs.data(), wqs, ws.data(), bias.data(), y.data(), m, n, k); });
        check_eq(std::string(m <= 8 ? "gemv_w8a8" : "gemm_w8a8 (int8 mma)") + tag, y, want);

        // FP8: codes of x / input_scale, E4M3 × E4M3 summed, scaled by input_scale · w_scale.
        const float input_scale = 0.004f;
        auto wf = wq;
        for (auto& b : wf) if ((b & 0x7f) == 0x7f) b = 0x7e;
        std::vector<uint8_t> xf(m * k);
        emu::launch(dim(4), dim(256), [&] { quantize_fp8(x.data(), xf.data(), input_scale, m * k); });
        std::vector<uint8_t> want_f(m * k);
        for (int i = 0; i < m * k; ++i) want_f[i] = f32_to_e4m3(x[i] / input_scale);
        check_eq("quantize_fp8" + tag, xf, want_f);
        if (m <= 8) continue;
        std::vector<double> wd(n * k);
        std::vector<float> xd(m * k);
        for (int i = 0; i < n * k; ++i) wd[i] = (double)e4m3_to_f32(wf[i]) * ws[i / k];
        for (int i = 0; i < m * k; ++i) xd[i] = e4m3_to_f32(xf[i]) * input_scale;
        std::fill(y.begin(), y.end(), NAN);
        emu::launch(dim((n + 63) / 64, (m + 63) / 64), dim(128), [&] {
            gemm_fp8_e4m3(xf.data(), input_scale, wf.data(), ws.data(), bias.data(), y.data(), m, n, k);
        });
        check("gemm_fp8_e4m3 (e4m3 mma)" + tag, y, ref_linear(xd, wd, bias, m, n, k), 1e-5);
    }
}

void attention() {
    // GQA 6 query heads over 2 KV heads, block size 4, shuffled block tables: sequence 0 is a
    // prefill chunk of 20 rows after 30 cached positions (two row tiles, two key tiles), sequence 1
    // one decode row at position 10.
    const int n_heads = 6, n_kv = 2, hd = 40, bs = 4, num_blocks = 16;
    std::vector<int> tables = {5, 2, 7, 0, 3, 6, 1, 15, 9, 12, 8, 14, 10, 4, 13, 11}, table_start = {0, 13};
    std::vector<int> row_seq, row_pos;
    for (int p = 30; p < 50; ++p) row_seq.push_back(0), row_pos.push_back(p);
    row_seq.push_back(1), row_pos.push_back(10);
    const std::vector<int> tiles = {0, 16, 16, 4, 20, 1};
    const int rows = (int)row_seq.size();
    auto slot = [&](int seq, int pos) { return tables[table_start[seq] + pos / bs] * bs + pos % bs; };
    const size_t pool_len = (size_t)num_blocks * bs * n_kv * hd;
    auto kf = rand_vec(pool_len, 40), vf = rand_vec(pool_len, 41);
    auto q = rand_vec(rows * n_heads * hd, 42);
    const float scale = 1.0f / std::sqrt((float)hd);

    // Write each row's own key/value through the kernels, as a forward pass does.
    auto knew = rand_vec(rows * n_kv * hd, 43), vnew = rand_vec(rows * n_kv * hd, 44);
    std::vector<int> slots(rows);
    for (int r = 0; r < rows; ++r) slots[r] = slot(row_seq[r], row_pos[r]);
    emu::launch(dim(rows, n_kv), dim(32), [&] { kv_write_f32(knew.data(), slots.data(), kf.data(), n_kv, hd); });
    emu::launch(dim(rows, n_kv), dim(32), [&] { kv_write_f32(vnew.data(), slots.data(), vf.data(), n_kv, hd); });

    // Int8 pool written from the f32 pool, head by head, with per-(slot, head) scales.
    std::vector<signed char> k8(pool_len), v8(pool_len);
    std::vector<float> ks(num_blocks * bs * n_kv), vs(num_blocks * bs * n_kv);
    std::vector<int> all_slots(num_blocks * bs);
    for (int i = 0; i < num_blocks * bs; ++i) all_slots[i] = i;
    emu::launch(dim(num_blocks * bs, n_kv), dim(32),
                [&] { kv_write_int8(kf.data(), all_slots.data(), k8.data(), ks.data(), n_kv, hd); });
    emu::launch(dim(num_blocks * bs, n_kv), dim(32),
                [&] { kv_write_int8(vf.data(), all_slots.data(), v8.data(), vs.data(), n_kv, hd); });
    std::vector<double> deq_k(pool_len), deq_v(pool_len);
    bool codes_ok = true;
    for (size_t i = 0; i < pool_len; ++i) {
        const size_t sh = i / hd;  // (slot, head)
        deq_k[i] = (double)k8[i] * ks[sh];
        deq_v[i] = (double)v8[i] * vs[sh];
        codes_ok &= std::fabs(deq_k[i] - kf[i]) <= ks[sh] * 0.5001 && std::fabs(deq_v[i] - vf[i]) <= vs[sh] * 0.5001;
    }
    if (!codes_ok) {
        std::printf("FAIL kv_write_int8: a code is more than half a step off\n");
        ++failures;
    } else {
        std::printf("ok   kv_write_int8\n");
    }

    // `window` keys per query (0: all earlier ones), as attention.cu's first_key.
    auto reference = [&](auto key, auto value, int window = 0, double softcap = 0) {
        std::vector<double> out(rows * n_heads * hd);
        for (int r = 0; r < rows; ++r)
            for (int h = 0; h < n_heads; ++h) {
                const int kvh = h / (n_heads / n_kv);
                const float* qr = &q[(r * n_heads + h) * hd];
                const int lo = window > 0 ? std::max(0, row_pos[r] + 1 - window) : 0;
                std::vector<double> logits(row_pos[r] + 1, -INFINITY);
                double mx = -INFINITY, den = 0;
                for (int p = lo; p <= row_pos[r]; ++p) {
                    const size_t base = ((size_t)slot(row_seq[r], p) * n_kv + kvh) * hd;
                    double d = 0;
                    for (int c = 0; c < hd; ++c) d += (double)(qr[c] * scale) * key(base + c);
                    if (softcap > 0) d = softcap * std::tanh(d / softcap);
                    logits[p] = d;
                    mx = std::max(mx, d);
                }
                for (auto& l : logits) den += (l = std::exp(l - mx));
                for (int c = 0; c < hd; ++c) {
                    double s = 0;
                    for (int p = lo; p <= row_pos[r]; ++p)
                        s += logits[p] * value(((size_t)slot(row_seq[r], p) * n_kv + kvh) * hd + c);
                    out[(r * n_heads + h) * hd + c] = s / den;
                }
            }
        return out;
    };
    AttnArgs a{q.data(), nullptr, row_seq.data(), row_pos.data(), tables.data(), table_start.data(),
               n_heads, n_kv, hd, bs, scale, 0, 0.0f};
    std::vector<float> out(rows * n_heads * hd);
    a.out = out.data();
    const auto want_f32 = reference([&](size_t i) { return (double)kf[i]; }, [&](size_t i) { return (double)vf[i]; });
    const auto want_int8 = reference([&](size_t i) { return deq_k[i]; }, [&](size_t i) { return deq_v[i]; });
    const unsigned n_tiles = tiles.size() / 2;
    std::fill(out.begin(), out.end(), NAN);
    emu::launch(dim(rows, n_heads), dim(128), [&] { paged_attention_f32(a, kf.data(), vf.data()); });
    check("paged_attention_f32 (GQA, prefill + decode rows)", out, want_f32, 1e-5);
    std::fill(out.begin(), out.end(), NAN);
    emu::launch(dim(rows, n_heads), dim(128),
                [&] { paged_attention_int8(a, k8.data(), ks.data(), v8.data(), vs.data()); });
    check("paged_attention_int8", out, want_int8, 1e-5);
    std::fill(out.begin(), out.end(), NAN);
    emu::launch(dim(n_tiles, n_heads), dim(128), [&] { paged_attention_tiled_f32(a, tiles.data(), kf.data(), vf.data()); });
    check("paged_attention_tiled_f32 (row tiles of 16 + 4 + 1, two key tiles)", out, want_f32, 1e-5);
    std::fill(out.begin(), out.end(), NAN);
    emu::launch(dim(n_tiles, n_heads), dim(128), [&] {
        paged_attention_tiled_int8(a, tiles.data(), k8.data(), ks.data(), v8.data(), vs.data());
    });
    check("paged_attention_tiled_int8", out, want_int8, 1e-5);
    // Sliding windows: shorter than a key tile, and crossing the first key tile's start; a
    // tight soft cap (Gemma 2's logit capping) with and without a window.
    const std::pair<int, float> masks[] = {{7, 0.0f}, {37, 0.0f}, {0, 0.5f}, {7, 2.0f}};
    for (auto [window, softcap] : masks) {
        AttnArgs w = a;
        w.window = window;
        w.softcap = softcap;
        const auto want = reference([&](size_t i) { return (double)kf[i]; },
                                    [&](size_t i) { return (double)vf[i]; }, window, softcap);
        const std::string what =
            " (window " + std::to_string(window) + ", softcap " + std::to_string(softcap) + ")";
        std::fill(out.begin(), out.end(), NAN);
        emu::launch(dim(rows, n_heads), dim(128), [&] { paged_attention_f32(w, kf.data(), vf.data()); });
        check(("paged_attention_f32" + what).c_str(), out, want, 1e-5);
        std::fill(out.begin(), out.end(), NAN);
        emu::launch(dim(n_tiles, n_heads), dim(128),
                    [&] { paged_attention_tiled_f32(w, tiles.data(), kf.data(), vf.data()); });
        check(("paged_attention_tiled_f32" + what).c_str(), out, want, 1e-5);
    }

    // 16-bit pools written from the f32 pool (each value within half an ulp: 2^-8 relative for
    // bf16, 2^-11 for f16), then both attention kernels against the widened values.
    auto half_pool = [&](const char* name, bool bf16) {
        std::vector<unsigned short> k16(pool_len), v16(pool_len);
        auto write = [&](const float* x, unsigned short* pool) {
            emu::launch(dim(num_blocks * bs, n_kv), dim(32), [&] {
                if (bf16) kv_write_bf16(x, all_slots.data(), pool, n_kv, hd);
                else kv_write_f16(x, all_slots.data(), pool, n_kv, hd);
            });
        };
        write(kf.data(), k16.data());
        write(vf.data(), v16.data());
        auto widen = [&](unsigned short h) { return (double)(bf16 ? bf16_to_f32(h) : f16_to_f32(h)); };
        const double rel = bf16 ? 1.0 / 256 : 1.0 / 2048;
        bool ok = true;
        for (size_t i = 0; i < pool_len; ++i)
            ok &= std::fabs(widen(k16[i]) - kf[i]) <= std::fabs(kf[i]) * rel + 1e-7 &&
                  std::fabs(widen(v16[i]) - vf[i]) <= std::fabs(vf[i]) * rel + 1e-7;
        std::printf("%s kv_write_%s\n", ok ? "ok  " : "FAIL", name);
        failures += !ok;
        const auto want = reference([&](size_t i) { return widen(k16[i]); }, [&](size_t i) { return widen(v16[i]); });
        std::fill(out.begin(), out.end(), NAN);
        emu::launch(dim(rows, n_heads), dim(128), [&] {
            if (bf16) paged_attention_bf16(a, k16.data(), v16.data());
            else paged_attention_f16(a, k16.data(), v16.data());
        });
        check(std::string("paged_attention_") + name, out, want, 1e-5);
        std::fill(out.begin(), out.end(), NAN);
        emu::launch(dim(n_tiles, n_heads), dim(128), [&] {
            if (bf16) paged_attention_tiled_bf16(a, tiles.data(), k16.data(), v16.data());
            else paged_attention_tiled_f16(a, tiles.data(), k16.data(), v16.data());
        });
        check(std::string("paged_attention_tiled_") + name, out, want, 1e-5);
    };
    half_pool("bf16", true);
    half_pool("f16", false);
}


// LoRA: 7 rows over two slots of a launch based at slot 8 (a plain module of rank 5, a fused one
// whose B has three blocks) and rows of other launches' slots or none, which stay unchanged.
void lora() {
    const int inputs = 45, outputs = 70, rows = 7;
    const auto x = rand_vec(rows * inputs, 21);
    const auto y0 = rand_vec(rows * outputs, 22);
    LoraArgs a{};
    a.inputs = inputs;
    a.outputs = outputs;
    a.slot_base = 8;
    const int ranks[2] = {5, 9};
    const int blocks[2][3][4] = {{{0, 70, 0, 5}}, {{0, 40, 0, 3}, {40, 15, 3, 3}, {55, 15, 6, 3}}};
    std::vector<float> f[2][2];
    for (int s = 0; s < 2; ++s) {
        f[s][0] = rand_vec(ranks[s] * inputs, 30 + s);
        f[s][1] = rand_vec(ranks[s] * outputs, 40 + s);
        a.slots[s].a = f[s][0].data();
        a.slots[s].bt = f[s][1].data();
        a.slots[s].rank = ranks[s];
        a.slots[s].n_blocks = s == 0 ? 1 : 3;
        std::memcpy(a.slots[s].blocks, blocks[s], sizeof(blocks[s]));
    }
    // (row, slot): slot 3 belongs to another launch, slot 10 to no adapter of this module.
    const std::vector<unsigned> pairs = {0, 9, 2, 8, 3, 8, 4, 3, 5, 10, 6, 9};
    std::vector<double> want(y0.begin(), y0.end());
    for (size_t p = 0; p < pairs.size(); p += 2) {
        const int row = pairs[p], s = (int)pairs[p + 1] - 8;
        if (s < 0 || s > 1) continue;
        std::vector<double> t(ranks[s]);
        for (int r = 0; r < ranks[s]; ++r)
            for (int i = 0; i < inputs; ++i) t[r] += (double)x[row * inputs + i] * f[s][0][r * inputs + i];
        for (int b = 0; b < a.slots[s].n_blocks; ++b) {
            const int* k = blocks[s][b];
            for (int o = k[0]; o < k[0] + k[1]; ++o)
                for (int r = k[2]; r < k[2] + k[3]; ++r) want[row * outputs + o] += t[r] * f[s][1][r * outputs + o];
        }
    }
    auto y = y0;
    a.x = x.data();
    a.y = y.data();
    a.rows = pairs.data();
    a.n_rows = (int)pairs.size() / 2;
    emu::launch(dim(a.n_rows), dim(LORA_THREADS), [&] { lora_bgmv_f32(a); });
    check("lora_bgmv_f32 (two slots, block-diagonal B, rows of other launches)", y, want, 1e-5);
}

}  // namespace

int main() {
    using Family = std::pair<const char*, void (*)()>;
    const Family families[] = {{"norms", norms},   {"pointwise", pointwise}, {"weight-only", weight_only},
                               {"8-bit", eight_bit}, {"attention", attention}, {"lora", lora}};
    for (auto [name, family] : families) {
        const auto t0 = std::chrono::steady_clock::now();
        family();
        const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
        std::printf("--   %s: %.1f s\n", name, dt.count());
    }
    if (failures) std::printf("%d kernel check(s) failed\n", failures);
    else std::printf("every kernel matches its reference under emulation\n");
    return failures ? 1 : 0;
}
