/* y[m, n] = sum_k x[m, k] * W[n, k] for a bitsandbytes 4-bit weight W [N, K], without materialising W.
 *
 * bitsandbytes' layout: the row-major weight flattened, two codes per byte (element 2i in the high nibble of byte i,
 * element 2i+1 in the low one), each run of `blocksize` elements scaled by its absmax, itself 8-bit quantized when
 * nested (absmax = code2[q] * absmax2[block / blocksize2] + offset, in fp32, as bitsandbytes dequantizes it).
 * Blocks never span rows here (K % blocksize == 0, blocksize % 32 == 0): the caller checks.
 *
 * Each block's 16 dequantized values, code[c] * absmax rounded to the weight's dtype (bf16 / fp16 / fp32), form a
 * 16-entry table, so the product with x reads only the 4-bit codes: the same values the dequantized weight holds,
 * multiplied and summed in fp32. x and y are fp32, bf16 or fp16 (y rounded once from the fp32 sums). Rows are split
 * over OpenMP threads (the runtime torch itself loads). Where the table holds bf16 values, AVX512-BF16 looks it up 32
 * codes at a time (vpermw) and multiplies in bf16 pairs (vdpbf16ps); AVX2 splits it into two 16-entry byte tables
 * that vpshufb looks up 32 codes at a time.
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

#define DTYPE_FP32 0
#define DTYPE_BF16 1
#define DTYPE_FP16 2

static inline float load_value(const void *x, int dtype, int64_t i) {
    if (dtype == DTYPE_BF16) {
        const uint32_t bits = (uint32_t)((const uint16_t *)x)[i] << 16;
        float value;
        memcpy(&value, &bits, 4);
        return value;
    }
    if (dtype == DTYPE_FP16) return (float)((const _Float16 *)x)[i];
    return ((const float *)x)[i];
}

/* An fp32 value's bits in bf16 / fp16 (DTYPE_BF16 / DTYPE_FP16), rounded to nearest even, a NaN kept a (quiet)
 * NaN: as torch converts. */
static inline uint16_t half_bits(float value, int dtype) {
    if (dtype == DTYPE_FP16) {
        const _Float16 half = (_Float16)value;
        uint16_t bits;
        memcpy(&bits, &half, 2);
        return bits;
    }
    uint32_t bits;
    memcpy(&bits, &value, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        bits |= 0x00400000u;
    } else {
        bits += 0x7fffu + ((bits >> 16) & 1u);
    }
    return (uint16_t)(bits >> 16);
}

static void store_values(const float *values, int64_t count, int dtype, void *y) {
    for (int64_t i = 0; i < count; i++) {
        if (dtype == DTYPE_FP32) {
            ((float *)y)[i] = values[i];
        } else {
            ((uint16_t *)y)[i] = half_bits(values[i], dtype);
        }
    }
}

/* Byte position (0-31) of a 32-byte run whose value the byte-table pass unpacks into slot q (0-31) of its four
 * vectors of 8: unpacking bytes into words works per 128-bit lane, and the words become fp32 in place (even ones
 * shifted up, odd ones masked), so a vector holds every other byte of one 8-byte run of each lane. */
static inline int64_t interleaved_position(int64_t q) {
    const int64_t vector = q / 8, i = q % 8;
    return (vector >> 1) * 8 + (i >> 2) * 16 + 2 * (i & 3) + (vector & 1);
}

/* x [M, K] in fp32, split into its even and odd columns, [M, K/2] each: the order the high and low nibbles come in;
 * `interleaved`: within each run of 32 bytes, in the order the byte-table pass unpacks its values. */
static void split_columns(const void *x, int dtype, int64_t M, int64_t K, int interleaved, float *even, float *odd) {
    const int64_t half = K / 2;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t j = 0; j < half; j++) {
            const int64_t p = interleaved ? (j & ~(int64_t)31) + interleaved_position(j & 31) : j;
            even[m * half + j] = load_value(x, dtype, m * K + 2 * p);
            odd[m * half + j] = load_value(x, dtype, m * K + 2 * p + 1);
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

/* bf16 mode with blocksize % 64 == 0: each table value is a bf16, whose two bytes fit two 16-entry byte tables
 * that vpshufb looks up 32 codes at a time (half the shuffles of `lookup`). Turning the byte pairs into fp32 puts
 * the values of a 32-byte run in the order of `interleaved_position`, the order x is stored in for this pass. */
static inline __m256i bf16_rounded_bits(__m256 value, float scale) {
    if (scale != scale) return _mm256_castps_si256(round_vector(value, ROUND_BF16)); /* keeps a NaN a NaN */
    /* Finite or infinite scales: round to nearest even without the NaN check (the low 16 bits are ignored). */
    const __m256i bits = _mm256_castps_si256(value);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
}

static inline void bf16_byte_tables(__m256 code_low, __m256 code_high, float scale, __m256i *low_bytes,
                                    __m256i *high_bytes) {
    const __m256 s = _mm256_set1_ps(scale);
    const __m256i a = bf16_rounded_bits(_mm256_mul_ps(code_low, s), scale);   /* values 0-7 */
    const __m256i b = bf16_rounded_bits(_mm256_mul_ps(code_high, s), scale);  /* values 8-15 */
    /* Bytes 2 (low) and 3 (high) of each value: per lane, dword 0 / 1 the low / high bytes of a's 4 values, dword
     * 2 / 3 those of b's; gathering dwords 0, 4, 2, 6 orders the low bytes of values 0-15, dwords 1, 5, 3, 7 the high. */
    const __m256i from_a = _mm256_setr_epi8(2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 6, 10, 14, 3,
                                            7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i from_b = _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1,
                                            -1, -1, -1, -1, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i bytes = _mm256_or_si256(_mm256_shuffle_epi8(a, from_a), _mm256_shuffle_epi8(b, from_b));
    *low_bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 2, 6, 0, 4, 2, 6));
    *high_bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(1, 5, 3, 7, 1, 5, 3, 7));
}

static inline __attribute__((always_inline)) void expand_bf16(__m256i index, __m256i low_bytes, __m256i high_bytes,
                                                              __m256 out[4]) {
    const __m256i upper = _mm256_set1_epi32((int)0xffff0000u);
    const __m256i low = _mm256_shuffle_epi8(low_bytes, index), high = _mm256_shuffle_epi8(high_bytes, index);
    const __m256i first = _mm256_unpacklo_epi8(low, high), second = _mm256_unpackhi_epi8(low, high);
    out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(first, 16));
    out[1] = _mm256_castsi256_ps(_mm256_and_si256(first, upper));
    out[2] = _mm256_castsi256_ps(_mm256_slli_epi32(second, 16));
    out[3] = _mm256_castsi256_ps(_mm256_and_si256(second, upper));
}

/* R rows (1 or 2): one accumulator per unpacked vector and nibble for one row, the nibbles sharing them for two. */
static inline __attribute__((always_inline)) void row_pass_byte_tables(const uint8_t *row, const scales_t *s,
                                                                __m256 code_low, __m256 code_high, int64_t blocksize,
                                                                int64_t blocks_per_row, int64_t first_block,
                                                                const float *even, const float *odd, int64_t half,
                                                                int R, float *out, int64_t out_stride) {
    const __m256i low_mask = _mm256_set1_epi8(0xf);
    __m256 acc[2][4], acc2[4];
    for (int k = 0; k < 4; k++) acc[0][k] = acc[1][k] = acc2[k] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; b++) {
        __m256i low_bytes, high_bytes;
        bf16_byte_tables(code_low, code_high, block_scale(s, first_block + b), &low_bytes, &high_bytes);
        for (int64_t j = b * (blocksize / 2); j < (b + 1) * (blocksize / 2); j += 32) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(row + j));
            __m256 high[4], low[4];
            expand_bf16(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask), low_bytes, high_bytes, high);
            expand_bf16(_mm256_and_si256(bytes, low_mask), low_bytes, high_bytes, low);
            if (R == 1) {
                for (int k = 0; k < 4; k++) {
                    acc[0][k] = _mm256_fmadd_ps(high[k], _mm256_loadu_ps(even + j + 8 * k), acc[0][k]);
                    acc2[k] = _mm256_fmadd_ps(low[k], _mm256_loadu_ps(odd + j + 8 * k), acc2[k]);
                }
            } else {
                for (int r = 0; r < R; r++) {
                    for (int k = 0; k < 4; k++) {
                        acc[r][k] = _mm256_fmadd_ps(high[k], _mm256_loadu_ps(even + r * half + j + 8 * k), acc[r][k]);
                        acc[r][k] = _mm256_fmadd_ps(low[k], _mm256_loadu_ps(odd + r * half + j + 8 * k), acc[r][k]);
                    }
                }
            }
        }
    }
    if (R == 1) {
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], acc2[k]);
    }
    for (int r = 0; r < R; r++) {
        const __m256 sum8 = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
        __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
        sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
        sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
        out[r * out_stride] = _mm_cvtss_f32(sum4);
    }
}

static void rows_kernel_byte_tables(const uint8_t *w, const scales_t *s, const float *code, int64_t blocksize,
                             const float *even, const float *odd, int64_t M, int64_t K, int64_t N, int64_t n0,
                             int64_t n1, float *y) {
    const __m256 code_low = _mm256_loadu_ps(code), code_high = _mm256_loadu_ps(code + 8);
    const int64_t half = K / 2, blocks_per_row = K / blocksize;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * half;
        int64_t m = 0;
#define PASS(R)                                                                                                     \
    row_pass_byte_tables(row, s, code_low, code_high, blocksize, blocks_per_row, n * blocks_per_row,                \
                         even + m * half, odd + m * half, half, R, y + m * N + n, N)
        for (; m + 2 <= M; m += 2) PASS(2);
        if (m < M) { PASS(1); m += 1; }
#undef PASS
    }
}

#define HAS_BYTE_TABLES 1

/* Dequantizing a whole block of bf16-rounded values (mode ROUND_BF16, blocksize % 32 == 0) into bf16 or fp32 with
 * the byte tables, 32 codes per step. */
static void dequantize_block_byte_tables(const uint8_t *w, int64_t start, int64_t end, const float *code,
                                         float scale, int dtype, void *out) {
    __m256i low_bytes, high_bytes;
    bf16_byte_tables(_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8), scale, &low_bytes, &high_bytes);
    const __m128i low_table = _mm256_castsi256_si128(low_bytes), high_table = _mm256_castsi256_si128(high_bytes);
    const __m128i mask = _mm_set1_epi8(0xf), zero = _mm_setzero_si128();
    for (int64_t j = start / 2; j < end / 2; j += 16) {
        const __m128i bytes = _mm_loadu_si128((const __m128i *)(w + j));
        const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask), low = _mm_and_si128(bytes, mask);
        const __m128i codes[2] = {_mm_unpacklo_epi8(high, low), _mm_unpackhi_epi8(high, low)}; /* element order */
        __m128i words[4];
        for (int h = 0; h < 2; h++) {
            const __m128i l = _mm_shuffle_epi8(low_table, codes[h]), u = _mm_shuffle_epi8(high_table, codes[h]);
            words[2 * h] = _mm_unpacklo_epi8(l, u);
            words[2 * h + 1] = _mm_unpackhi_epi8(l, u);
        }
        for (int k = 0; k < 4; k++) {
            if (dtype == DTYPE_BF16) {
                _mm_storeu_si128((__m128i *)((uint16_t *)out + 2 * j + 8 * k), words[k]);
            } else {
                float *o = (float *)out + 2 * j + 8 * k;
                _mm_storeu_si128((__m128i *)o, _mm_unpacklo_epi16(zero, words[k]));
                _mm_storeu_si128((__m128i *)(o + 4), _mm_unpackhi_epi16(zero, words[k]));
            }
        }
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

/* One block's 16 dequantized values, code[c] * scale rounded to `mode`. */
static inline void block_table(const float *code, float scale, int mode, float table[16]) {
#if defined(GEMV4_AVX512) || defined(GEMV4_AVX512_BF16)
    _mm512_storeu_ps(table, round_vector(_mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale)), mode));
#elif defined(GEMV4_AVX2)
    const __m256 s = _mm256_set1_ps(scale);
    _mm256_storeu_ps(table, round_vector(_mm256_mul_ps(_mm256_loadu_ps(code), s), mode));
    _mm256_storeu_ps(table + 8, round_vector(_mm256_mul_ps(_mm256_loadu_ps(code + 8), s), mode));
#else
    for (int c = 0; c < 16; c++) table[c] = round_scalar(code[c] * scale, mode);
#endif
}

/* out = the 4-bit weight's `count` values dequantized, in `dtype` (DTYPE_*): code[c] * absmax rounded to `mode` (the
 * quant state's dtype, as bitsandbytes' dequantize_4bit returns it), then converted to `dtype` as torch converts.
 * Blocks run over the flattened weight, so they may span rows. Returns 0. */
int dequantize_4bit(const uint8_t *w, int64_t count, int64_t blocksize, const float *code, int mode,
                    const float *absmax, const uint8_t *qabsmax, const float *code2, const float *absmax2,
                    int64_t blocksize2, float offset, void *out, int dtype, int threads) {
    scales_t s = {absmax, qabsmax, code2, absmax2, blocksize2, offset, qabsmax != NULL};
    const int64_t blocks = (count + blocksize - 1) / blocksize, parts = thread_parts(blocks, threads);
#pragma omp parallel for num_threads(parts) schedule(static)
    for (int64_t part = 0; part < parts; part++) {
        float table[16];
        uint16_t half_table[16];
        for (int64_t b = blocks * part / parts; b < blocks * (part + 1) / parts; b++) {
            const float scale = block_scale(&s, b);
            const int64_t start = b * blocksize, end = start + blocksize < count ? start + blocksize : count;
#if defined(HAS_BYTE_TABLES)
            if (mode == ROUND_BF16 && (dtype == DTYPE_BF16 || dtype == DTYPE_FP32) && end - start == blocksize &&
                blocksize % 32 == 0) {
                dequantize_block_byte_tables(w, start, end, code, scale, dtype, out);
                continue;
            }
#endif
            block_table(code, scale, mode, table);
            if (dtype == DTYPE_FP32) {
                float *o = (float *)out;
                for (int64_t i = start; i + 1 < end; i += 2) {
                    o[i] = table[w[i / 2] >> 4];
                    o[i + 1] = table[w[i / 2] & 0xf];
                }
                if ((end - start) % 2) o[end - 1] = table[w[(end - 1) / 2] >> 4];
            } else {
                for (int c = 0; c < 16; c++) half_table[c] = half_bits(table[c], dtype);
                uint16_t *o = (uint16_t *)out;
                for (int64_t i = start; i + 1 < end; i += 2) {
                    o[i] = half_table[w[i / 2] >> 4];
                    o[i + 1] = half_table[w[i / 2] & 0xf];
                }
                if ((end - start) % 2) o[end - 1] = half_table[w[(end - 1) / 2] >> 4];
            }
        }
    }
    return 0;
}

/* The entry point (ctypes). y [M, N] = x [M, K] times W.T, x and y in `dtype` (DTYPE_*), the products summed in fp32
 * and rounded once to `dtype`; `mode` (ROUND_*) is the dtype the dequantized weight is rounded to. Returns 0, or 1
 * when the scratch memory could not be allocated. */
int gemv_4bit(const void *x, int dtype, int64_t M, int64_t K, int64_t N, const uint8_t *w, int64_t blocksize,
              const float *code, int mode, const float *absmax, const uint8_t *qabsmax, const float *code2,
              const float *absmax2, int64_t blocksize2, float offset, void *y, int threads) {
    scales_t s = {absmax, qabsmax, code2, absmax2, blocksize2, offset, qabsmax != NULL};
    const int64_t half = K / 2, parts = thread_parts(N, threads);
    float *out = dtype == DTYPE_FP32 ? (float *)y : (float *)malloc(sizeof(float) * (size_t)(M * N));
    if (out == NULL) return 1;
    int status = 0;
#if defined(GEMV4_AVX512_BF16)
    if (dtype == DTYPE_BF16 && mode == ROUND_BF16 && blocksize % 64 == 0) {
        uint16_t *even = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(M * K));
        if (even == NULL) {
            status = 1;
        } else {
            uint16_t *odd = even + M * half;
            const uint16_t *bits = (const uint16_t *)x;
            for (int64_t m = 0; m < M; m++) {
                for (int64_t j = 0; j < half; j++) {
                    even[m * half + j] = bits[m * K + 2 * j];
                    odd[m * half + j] = bits[m * K + 2 * j + 1];
                }
            }
#pragma omp parallel for num_threads(parts) schedule(static)
            for (int64_t part = 0; part < parts; part++) {
                rows_kernel_bf16(w, &s, code, blocksize, even, odd, M, K, N, N * part / parts,
                                 N * (part + 1) / parts, out);
            }
            free(even);
        }
    } else
#endif
    {
        float *even = (float *)malloc(sizeof(float) * (size_t)(M * K));
        if (even == NULL) {
            status = 1;
        } else {
            float *odd = even + M * half;
#if defined(HAS_BYTE_TABLES)
            const int byte_tables = mode == ROUND_BF16 && blocksize % 64 == 0;
#else
            const int byte_tables = 0;
#endif
            split_columns(x, dtype, M, K, byte_tables, even, odd);
#pragma omp parallel for num_threads(parts) schedule(static)
            for (int64_t part = 0; part < parts; part++) {
                const int64_t n0 = N * part / parts, n1 = N * (part + 1) / parts;
#if defined(HAS_BYTE_TABLES)
                if (byte_tables) {
                    rows_kernel_byte_tables(w, &s, code, blocksize, even, odd, M, K, N, n0, n1, out);
                    continue;
                }
#endif
                rows_kernel(w, &s, code, mode, blocksize, even, odd, M, K, N, n0, n1, out);
            }
            free(even);
        }
    }
    if (out != (float *)y) {
        if (status == 0) store_values(out, M * N, dtype, y);
        free(out);
    }
    return status;
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
