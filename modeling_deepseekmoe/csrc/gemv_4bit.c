/* y[m, n] = sum_k x[m, k] * W[n, k] for a bitsandbytes 4-bit weight W [N, K], without materialising W.
 *
 * bitsandbytes' layout: the row-major weight flattened, two codes per byte (element 2i in the high nibble of byte i,
 * element 2i+1 in the low one), each run of `blocksize` elements scaled by its absmax, itself 8-bit quantized when
 * nested (absmax = code2[q] * absmax2[block / blocksize2] + offset, in fp32, as bitsandbytes dequantizes it).
 * Blocks never span rows here (K % blocksize == 0, blocksize % 32 == 0): the caller checks.
 *
 * Each block's 16 dequantized values, code[c] * absmax rounded to the weight's dtype (bf16 / fp16 / fp32), form a
 * 16-entry table, so the product with x reads only the 4-bit codes: the same values the dequantized weight holds,
 * multiplied and summed in fp32. Rows are split over OpenMP threads (the runtime torch itself loads).
 *
 * Built at first use by `modeling_deepseekmoe/cpu_4bit_kernel.py` for the CPU's vector ISA (AVX512F, AVX2 + FMA,
 * or portable C), chosen there. Compiled with -ffp-contract=off: the scale arithmetic is bitsandbytes' exactly.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(GEMV4_AVX512) || defined(GEMV4_AVX2) || defined(GEMV4_AVX512_BF16)
#include <immintrin.h>
#endif

#define ROUND_NONE 0
#define ROUND_BF16 1
#define ROUND_FP16 2

typedef struct {
    const float *absmax;    /* [N * K / blocksize] when not nested */
    const uint8_t *qabsmax; /* nested: the 8-bit absmax codes */
    const float *code2;     /* nested: [256] */
    const float *absmax2;   /* nested: one per blocksize2 blocks */
    int64_t blocksize2;
    float offset;
    int nested;
} scales_t;

static inline float block_scale(const scales_t *s, int64_t block) {
    if (s->nested) {
        float value = s->code2[s->qabsmax[block]] * s->absmax2[block / s->blocksize2];
        return value + s->offset;
    }
    return s->absmax[block];
}

static inline float round_scalar(float value, int mode) {
    if (mode == ROUND_BF16) {
        uint32_t bits;
        memcpy(&bits, &value, 4);
        if ((bits & 0x7f800000u) != 0x7f800000u) { /* finite: round to nearest even on the 16 low bits */
            bits += 0x7fffu + ((bits >> 16) & 1u);
        }
        bits &= 0xffff0000u;
        memcpy(&value, &bits, 4);
    } else if (mode == ROUND_FP16) {
        value = (float)(_Float16)value;
    }
    return value;
}

/* How many row ranges to split N output rows into: 16 rows or more per thread, fewer would not pay for waking one. */
static int64_t thread_parts(int64_t N, int threads) {
    int64_t parts = N / 16 < threads ? N / 16 : threads;
    return parts < 1 ? 1 : parts;
}

/* x [M, K] split into its even and odd columns, [M, K/2] each: the order the high and low nibbles come in. */
static void split_columns(const float *x, int64_t M, int64_t K, float *even, float *odd) {
    int64_t half = K / 2;
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        for (int64_t j = 0; j < half; j++) {
            even[m * half + j] = row[2 * j];
            odd[m * half + j] = row[2 * j + 1];
        }
    }
}

#if defined(GEMV4_AVX512) || defined(GEMV4_AVX512_BF16)

static inline __m512 round_vector(__m512 value, int mode) {
    if (mode == ROUND_BF16) {
        __m512i bits = _mm512_castps_si512(value);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        __m512i exponent = _mm512_and_si512(bits, _mm512_set1_epi32(0x7f800000));
        __mmask16 finite = _mm512_cmpneq_epi32_mask(exponent, _mm512_set1_epi32(0x7f800000));
        bits = _mm512_mask_mov_epi32(bits, finite, rounded);
        return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xffff0000u)));
    }
    if (mode == ROUND_FP16) {
        return _mm512_cvtph_ps(_mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    return value;
}

/* One output row n for R rows of x (R a compile-time constant after inlining: the accumulators stay in registers). */
static inline __attribute__((always_inline)) void row_pass(const uint8_t *row, const scales_t *s, __m512 code_vector,
                                                           int mode, int64_t blocksize, int64_t blocks_per_row,
                                                           int64_t first_block, const float *even, const float *odd,
                                                           int64_t half, int R, float *out, int64_t out_stride) {
    const __m512i low_mask = _mm512_set1_epi32(0xf);
    __m512 acc[8], acc2[8];
    for (int r = 0; r < R; r++) acc[r] = acc2[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; b++) {
        const __m512 table =
            round_vector(_mm512_mul_ps(code_vector, _mm512_set1_ps(block_scale(s, first_block + b))), mode);
        for (int64_t j = b * (blocksize / 2); j < (b + 1) * (blocksize / 2); j += 16) {
            const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + j)));
            const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
            const __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_mask), table);
            for (int r = 0; r < R; r++) {
                acc[r] = _mm512_fmadd_ps(high, _mm512_loadu_ps(even + r * half + j), acc[r]);
                acc2[r] = _mm512_fmadd_ps(low, _mm512_loadu_ps(odd + r * half + j), acc2[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) out[r * out_stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
}

static void rows_kernel(const uint8_t *w, const scales_t *s, const float *code, int mode, int64_t blocksize,
                        const float *even, const float *odd, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1,
                        float *y) {
    const __m512 code_vector = _mm512_loadu_ps(code);
    const int64_t half = K / 2, blocks_per_row = K / blocksize;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * half;
        int64_t m = 0;
#define PASS(R)                                                                                                     \
    row_pass(row, s, code_vector, mode, blocksize, blocks_per_row, n * blocks_per_row, even + m * half,              \
             odd + m * half, half, R, y + m * N + n, N)
        for (; m + 8 <= M; m += 8) PASS(8);
        if (m + 4 <= M) { PASS(4); m += 4; }
        if (m + 2 <= M) { PASS(2); m += 2; }
        if (m < M) { PASS(1); m += 1; }
#undef PASS
    }
}

#elif defined(GEMV4_AVX2)

static inline __m256 round_vector(__m256 value, int mode) {
    if (mode == ROUND_BF16) {
        __m256i bits = _mm256_castps_si256(value);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
        __m256i exponent = _mm256_and_si256(bits, _mm256_set1_epi32(0x7f800000));
        __m256i infinite = _mm256_cmpeq_epi32(exponent, _mm256_set1_epi32(0x7f800000));
        bits = _mm256_blendv_epi8(rounded, bits, infinite);
        return _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32((int)0xffff0000u)));
    }
    if (mode == ROUND_FP16) {
        return _mm256_cvtph_ps(_mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    return value;
}

static inline __m256 lookup(__m256i index, __m256 table_low, __m256 table_high) {
    const __m256 from_low = _mm256_permutevar8x32_ps(table_low, index);
    const __m256 from_high = _mm256_permutevar8x32_ps(table_high, index);
    const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(index, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(from_low, from_high, upper);
}

static inline __attribute__((always_inline)) void row_pass(const uint8_t *row, const scales_t *s, __m256 code_low,
                                                           __m256 code_high, int mode, int64_t blocksize,
                                                           int64_t blocks_per_row, int64_t first_block,
                                                           const float *even, const float *odd, int64_t half, int R,
                                                           float *out, int64_t out_stride) {
    const __m256i low_mask = _mm256_set1_epi32(0xf);
    __m256 acc[4], acc2[4];
    for (int r = 0; r < R; r++) acc[r] = acc2[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; b++) {
        const __m256 scale = _mm256_set1_ps(block_scale(s, first_block + b));
        const __m256 table_low = round_vector(_mm256_mul_ps(code_low, scale), mode);
        const __m256 table_high = round_vector(_mm256_mul_ps(code_high, scale), mode);
        for (int64_t j = b * (blocksize / 2); j < (b + 1) * (blocksize / 2); j += 8) {
            const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + j)));
            const __m256 high = lookup(_mm256_srli_epi32(bytes, 4), table_low, table_high);
            const __m256 low = lookup(_mm256_and_si256(bytes, low_mask), table_low, table_high);
            for (int r = 0; r < R; r++) {
                acc[r] = _mm256_fmadd_ps(high, _mm256_loadu_ps(even + r * half + j), acc[r]);
                acc2[r] = _mm256_fmadd_ps(low, _mm256_loadu_ps(odd + r * half + j), acc2[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const __m256 sum8 = _mm256_add_ps(acc[r], acc2[r]);
        __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
        sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
        sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
        out[r * out_stride] = _mm_cvtss_f32(sum4);
    }
}

static void rows_kernel(const uint8_t *w, const scales_t *s, const float *code, int mode, int64_t blocksize,
                        const float *even, const float *odd, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1,
                        float *y) {
    const __m256 code_low = _mm256_loadu_ps(code), code_high = _mm256_loadu_ps(code + 8);
    const int64_t half = K / 2, blocks_per_row = K / blocksize;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * half;
        int64_t m = 0;
#define PASS(R)                                                                                                     \
    row_pass(row, s, code_low, code_high, mode, blocksize, blocks_per_row, n * blocks_per_row, even + m * half,      \
             odd + m * half, half, R, y + m * N + n, N)
        for (; m + 4 <= M; m += 4) PASS(4);
        if (m + 2 <= M) { PASS(2); m += 2; }
        if (m < M) { PASS(1); m += 1; }
#undef PASS
    }
}

#else

static void rows_kernel(const uint8_t *w, const scales_t *s, const float *code, int mode, int64_t blocksize,
                        const float *even, const float *odd, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1,
                        float *y) {
    const int64_t half = K / 2, blocks_per_row = K / blocksize;
    float table[16];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * half;
        for (int64_t m = 0; m < M; m++) y[m * N + n] = 0.0f;
        for (int64_t b = 0; b < blocks_per_row; b++) {
            const float scale = block_scale(s, n * blocks_per_row + b);
            for (int c = 0; c < 16; c++) table[c] = round_scalar(code[c] * scale, mode);
            for (int64_t m = 0; m < M; m++) {
                float sum = 0.0f;
                for (int64_t j = b * (blocksize / 2); j < (b + 1) * (blocksize / 2); j++) {
                    sum += table[row[j] >> 4] * even[m * half + j] + table[row[j] & 0xf] * odd[m * half + j];
                }
                y[m * N + n] += sum;
            }
        }
    }
}

#endif

#if defined(GEMV4_AVX512_BF16)
/* bf16 x times a weight dequantized in bf16: each block's table holds the 16 values rounded to bf16 (as the
 * dequantized bf16 weight holds them), looked up 32 at a time (vpermw), and multiplied with x in pairs summed in fp32
 * (vdpbf16ps). Needs blocksize % 64 == 0: 64 codes (32 bytes) per step. */
static inline __attribute__((always_inline)) void row_pass_bf16(const uint8_t *row, const scales_t *s,
                                                                __m512 code_vector, int64_t blocksize,
                                                                int64_t blocks_per_row, int64_t first_block,
                                                                const uint16_t *even, const uint16_t *odd,
                                                                int64_t half, int R, float *out, int64_t out_stride) {
    const __m512i low_mask = _mm512_set1_epi16(0xf);
    __m512 acc[8], acc2[8];
    for (int r = 0; r < R; r++) acc[r] = acc2[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; b++) {
        const __m512 values = _mm512_mul_ps(code_vector, _mm512_set1_ps(block_scale(s, first_block + b)));
        const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
        for (int64_t j = b * (blocksize / 2); j < (b + 1) * (blocksize / 2); j += 32) {
            const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + j)));
            const __m512bh high = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
            const __m512bh low = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(bytes, low_mask), table);
            for (int r = 0; r < R; r++) {
                acc[r] = _mm512_dpbf16_ps(acc[r], high, (__m512bh)_mm512_loadu_si512(even + r * half + j));
                acc2[r] = _mm512_dpbf16_ps(acc2[r], low, (__m512bh)_mm512_loadu_si512(odd + r * half + j));
            }
        }
    }
    for (int r = 0; r < R; r++) out[r * out_stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
}

static void rows_kernel_bf16(const uint8_t *w, const scales_t *s, const float *code, int64_t blocksize,
                             const uint16_t *even, const uint16_t *odd, int64_t M, int64_t K, int64_t N, int64_t n0,
                             int64_t n1, float *y) {
    const __m512 code_vector = _mm512_loadu_ps(code);
    const int64_t half = K / 2, blocks_per_row = K / blocksize;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * half;
        int64_t m = 0;
#define PASS(R)                                                                                                     \
    row_pass_bf16(row, s, code_vector, blocksize, blocks_per_row, n * blocks_per_row, even + m * half,               \
                  odd + m * half, half, R, y + m * N + n, N)
        for (; m + 8 <= M; m += 8) PASS(8);
        if (m + 4 <= M) { PASS(4); m += 4; }
        if (m + 2 <= M) { PASS(2); m += 2; }
        if (m < M) { PASS(1); m += 1; }
#undef PASS
    }
}
#endif

/* y [M, N] fp32 = x [M, K] (bf16 bits) times the weight dequantized in bf16; returns 0, 1 when the scratch memory
 * could not be allocated, 2 when this build has no bf16 kernel (the caller then uses gemv_4bit). */
int gemv_4bit_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t N, const uint8_t *w, int64_t blocksize,
                   const float *code, const float *absmax, const uint8_t *qabsmax, const float *code2,
                   const float *absmax2, int64_t blocksize2, float offset, float *y, int threads) {
#if defined(GEMV4_AVX512_BF16)
    scales_t s = {absmax, qabsmax, code2, absmax2, blocksize2, offset, qabsmax != NULL};
    const int64_t half = K / 2;
    uint16_t *even = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(M * K));
    if (even == NULL) return 1;
    uint16_t *odd = even + M * half;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t j = 0; j < half; j++) {
            even[m * half + j] = x[m * K + 2 * j];
            odd[m * half + j] = x[m * K + 2 * j + 1];
        }
    }
    const int64_t parts = thread_parts(N, threads);
#pragma omp parallel for num_threads(parts) schedule(static)
    for (int64_t part = 0; part < parts; part++) {
        const int64_t n0 = N * part / parts, n1 = N * (part + 1) / parts;
        rows_kernel_bf16(w, &s, code, blocksize, even, odd, M, K, N, n0, n1, y);
    }
    free(even);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)N; (void)w; (void)blocksize; (void)code; (void)absmax; (void)qabsmax;
    (void)code2; (void)absmax2; (void)blocksize2; (void)offset; (void)y; (void)threads;
    return 2;
#endif
}

/* The entry point (ctypes): returns 0, or 1 when the scratch memory could not be allocated. */
int gemv_4bit(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *w, int64_t blocksize,
              const float *code, int mode, const float *absmax, const uint8_t *qabsmax, const float *code2,
              const float *absmax2, int64_t blocksize2, float offset, float *y, int threads) {
    scales_t s = {absmax, qabsmax, code2, absmax2, blocksize2, offset, qabsmax != NULL};
    float *even = (float *)malloc(sizeof(float) * (size_t)(M * K));
    if (even == NULL) return 1;
    float *odd = even + M * (K / 2);
    split_columns(x, M, K, even, odd);
    const int64_t parts = thread_parts(N, threads);
#pragma omp parallel for num_threads(parts) schedule(static)
    for (int64_t part = 0; part < parts; part++) {
        const int64_t n0 = N * part / parts, n1 = N * (part + 1) / parts;
        rows_kernel(w, &s, code, mode, blocksize, even, odd, M, K, N, n0, n1, y);
    }
    free(even);
    return 0;
}

/* Which variant this build is, for `deepseekmoe env` and the tests. */
const char *gemv_4bit_isa(void) {
#if defined(GEMV4_AVX512_BF16)
    return "avx512_bf16";
#elif defined(GEMV4_AVX512)
    return "avx512";
#elif defined(GEMV4_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}
