/*
 * workbench.formats._zfile_native: the hot loop of the ZFile reader in C.
 *
 * A ZFile read fetches one contiguous run of compressed blocks. For each block this module
 * checks the CRC32C stored after it (OverlayBD's raw form: the register starts at the seed,
 * no inversion in or out), decompresses it with the system liblz4 or libzstd straight into
 * the caller's output, and checks that it decompressed to exactly the expected length. The
 * loop runs without the GIL, so reads from several threads proceed in parallel.
 *
 * Contract shared by `decode_blocks` and `read_range`:
 *   raw              the compressed bytes of blocks [0, n) of the range, back to back;
 *   bounds           n + 1 u64 offsets (a buffer of 8-byte unsigned integers, e.g. a numpy
 *                    uint64 array, or a list of ints): block i is raw[bounds[i] - bounds[0]
 *                    : bounds[i + 1] - bounds[0]], its last `crc_size` bytes being the CRC;
 *                    offsets may be relative (bounds[0] == 0) or absolute in the file;
 *   block_size       decompressed size of every block but the last of the range;
 *   last_block_size  decompressed size of the last block of the range;
 *   algo             1 lz4 (raw block), 2 zstd (one frame per block);
 *   crc_size         0 or 4; check_crc: whether to verify the CRC when crc_size is 4.
 * Failures of the data return a tuple (position, kind, stored_crc, computed_crc, detail),
 * position being the block's index in the range and kind "crc", "decompress" or "length";
 * the caller turns it into its own error. Misuse (bad sizes, bounds outside raw, an output
 * too small) raises ValueError or TypeError.
 *
 * Caveats:
 * - the zstd decompression context is one per thread, created on first use and freed when
 *   the thread exits (a pthread key), so a thread that read once keeps about 100 KiB;
 * - hardware CRC32C is used on x86-64 with SSE4.2 (three interleaved streams) and on ARMv8
 *   with the CRC extension (one stream; not exercised on these x86 machines), both checked at
 *   run time; elsewhere a byte-at-a-time table, about ten times slower;
 * - bounds given as a Python list are converted into a temporary array on every call; the
 *   reader passes a view of its numpy jump table instead.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include <lz4.h>
#include <zstd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define HAVE_X86_CRC 1
#endif

#if defined(__aarch64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#include <arm_acle.h>
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#define HAVE_ARM_CRC 1
#endif

#define ALGO_LZ4 1
#define ALGO_ZSTD 2
#define MAX_BLOCK_SIZE (1 << 20)

/* ------------------------------------------------------------------------------------------
 * CRC32C, raw form (no inversion): the Castagnoli polynomial, reflected. */

static uint32_t crc_table[256];

static void crc_table_init(void) {
    for (uint32_t byte = 0; byte < 256; byte++) {
        uint32_t crc = byte;
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
        crc_table[byte] = crc;
    }
}

static uint32_t crc32c_portable(uint32_t crc, const uint8_t *data, size_t size) {
    for (size_t i = 0; i < size; i++)
        crc = crc_table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return crc;
}

/* The CRC instruction has a latency of three cycles but a throughput of one per cycle, so
 * three independent streams over three adjacent stretches of `stretch` bytes run about three
 * times faster than one. The raw CRC is linear in its register: the CRC of A then B is
 * shift_|B|(crc(A)) ^ crc(B from 0), shift_n being "feed n zero bytes", applied with a table
 * per stretch length. */
#define CRC_LONG 4096
#define CRC_SHORT 256

static uint32_t shift_long[4][256];
static uint32_t shift_short[4][256];

static uint32_t crc32c_zeros(uint32_t crc, size_t count) {
    while (count--)
        crc = crc_table[crc & 0xFF] ^ (crc >> 8);
    return crc;
}

static void shift_table_init(uint32_t table[4][256], size_t count) {
    uint32_t basis[32];
    for (int bit = 0; bit < 32; bit++)
        basis[bit] = crc32c_zeros(1u << bit, count);
    for (int k = 0; k < 4; k++) {
        for (int byte = 0; byte < 256; byte++) {
            uint32_t image = 0;
            for (int bit = 0; bit < 8; bit++)
                if (byte >> bit & 1)
                    image ^= basis[8 * k + bit];
            table[k][byte] = image;
        }
    }
}

static inline uint32_t crc32c_shift(const uint32_t table[4][256], uint32_t crc) {
    return table[0][crc & 0xFF] ^ table[1][(crc >> 8) & 0xFF] ^ table[2][(crc >> 16) & 0xFF] ^
           table[3][crc >> 24];
}

#ifdef HAVE_X86_CRC
static inline uint64_t load64(const uint8_t *data) {
    uint64_t word;
    memcpy(&word, data, 8); /* unaligned load; the instruction wants the LE value */
    return word;
}

__attribute__((target("sse4.2"))) static uint32_t
crc32c_x86_three(uint32_t crc, const uint8_t **data, size_t *size, size_t stretch,
                 const uint32_t table[4][256]) {
    while (*size >= 3 * stretch) {
        const uint8_t *p = *data, *end = p + stretch;
        uint64_t crc0 = crc, crc1 = 0, crc2 = 0;
        do {
            crc0 = _mm_crc32_u64(crc0, load64(p));
            crc1 = _mm_crc32_u64(crc1, load64(p + stretch));
            crc2 = _mm_crc32_u64(crc2, load64(p + 2 * stretch));
            p += 8;
        } while (p < end);
        crc = crc32c_shift(table, (uint32_t)crc0) ^ (uint32_t)crc1;
        crc = crc32c_shift(table, crc) ^ (uint32_t)crc2;
        *data += 3 * stretch;
        *size -= 3 * stretch;
    }
    return crc;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_x86(uint32_t crc, const uint8_t *data,
                                                             size_t size) {
    crc = crc32c_x86_three(crc, &data, &size, CRC_LONG, shift_long);
    crc = crc32c_x86_three(crc, &data, &size, CRC_SHORT, shift_short);
    uint64_t wide = crc;
    for (; size >= 8; size -= 8, data += 8)
        wide = _mm_crc32_u64(wide, load64(data));
    crc = (uint32_t)wide;
    for (; size > 0; size--, data++)
        crc = _mm_crc32_u8(crc, *data);
    return crc;
}
#endif

#ifdef HAVE_ARM_CRC
__attribute__((target("+crc"))) static uint32_t crc32c_arm(uint32_t crc, const uint8_t *data,
                                                           size_t size) {
    for (; size >= 8; size -= 8, data += 8) {
        uint64_t word;
        memcpy(&word, data, 8);
        crc = __crc32cd(crc, word);
    }
    for (; size > 0; size--, data++)
        crc = __crc32cb(crc, *data);
    return crc;
}
#endif

typedef uint32_t (*crc_function)(uint32_t, const uint8_t *, size_t);
static crc_function crc32c_fast = crc32c_portable;
static const char *crc_implementation = "table";

static void crc_select(void) {
    crc_table_init();
    shift_table_init(shift_long, CRC_LONG);
    shift_table_init(shift_short, CRC_SHORT);
#ifdef HAVE_X86_CRC
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        crc32c_fast = crc32c_x86;
        crc_implementation = "sse4.2";
    }
#endif
#ifdef HAVE_ARM_CRC
    if (getauxval(AT_HWCAP) & HWCAP_CRC32) {
        crc32c_fast = crc32c_arm;
        crc_implementation = "armv8-crc";
    }
#endif
}

/* ------------------------------------------------------------------------------------------
 * One zstd decompression context per thread: creating one costs microseconds, as much as
 * decompressing a 4 KiB block. The key's destructor frees it when the thread ends. */

static pthread_key_t dctx_key;
static int dctx_key_ready = 0;

static void dctx_free(void *dctx) { ZSTD_freeDCtx((ZSTD_DCtx *)dctx); }

static ZSTD_DCtx *thread_dctx(void) {
    ZSTD_DCtx *dctx = (ZSTD_DCtx *)pthread_getspecific(dctx_key);
    if (dctx == NULL) {
        dctx = ZSTD_createDCtx();
        if (dctx != NULL && pthread_setspecific(dctx_key, dctx) != 0) {
            ZSTD_freeDCtx(dctx);
            dctx = NULL;
        }
    }
    return dctx;
}

/* ------------------------------------------------------------------------------------------
 * The decoding loop. */

enum failure_kind { FAIL_NONE = 0, FAIL_CRC, FAIL_DECOMPRESS, FAIL_LENGTH };

typedef struct {
    const uint8_t *raw;
    Py_ssize_t raw_size;
    const uint64_t *bounds; /* n + 1 values */
    Py_ssize_t count;       /* n */
    Py_ssize_t block_size;
    Py_ssize_t last_block_size;
    int algo;
    Py_ssize_t crc_size;
    int check_crc;
} range_spec;

typedef struct {
    enum failure_kind kind;
    Py_ssize_t position;
    uint32_t stored;
    uint32_t computed;
    long long length; /* FAIL_LENGTH: what the block decompressed to */
    int code;         /* FAIL_DECOMPRESS: lz4 return value */
    const char *message;
} failure;

static const uint32_t SEED_BLOCK = 100007;

/* Check and decompress block i into dst (capacity = its expected size). No GIL needed. */
static int decode_one(const range_spec *spec, ZSTD_DCtx *dctx, Py_ssize_t i, uint8_t *dst,
                      failure *fail) {
    uint64_t base = spec->bounds[0];
    const uint8_t *payload = spec->raw + (spec->bounds[i] - base);
    Py_ssize_t stored_size = (Py_ssize_t)(spec->bounds[i + 1] - spec->bounds[i]);
    Py_ssize_t payload_size = stored_size - spec->crc_size;
    Py_ssize_t expected = i == spec->count - 1 ? spec->last_block_size : spec->block_size;

    fail->position = i;
    if (spec->crc_size && spec->check_crc) {
        const uint8_t *tail = payload + payload_size;
        uint32_t stored = (uint32_t)tail[0] | (uint32_t)tail[1] << 8 | (uint32_t)tail[2] << 16 |
                          (uint32_t)tail[3] << 24;
        uint32_t computed = crc32c_fast(SEED_BLOCK, payload, (size_t)payload_size);
        if (computed != stored) {
            fail->kind = FAIL_CRC;
            fail->stored = stored;
            fail->computed = computed;
            return -1;
        }
    }

    long long produced;
    if (spec->algo == ALGO_LZ4) {
        int n = LZ4_decompress_safe((const char *)payload, (char *)dst, (int)payload_size,
                                    (int)expected);
        if (n < 0) {
            fail->kind = FAIL_DECOMPRESS;
            fail->code = n;
            fail->message = NULL;
            return -1;
        }
        produced = n;
    } else {
        size_t n = ZSTD_decompressDCtx(dctx, dst, (size_t)expected, payload, (size_t)payload_size);
        if (ZSTD_isError(n)) {
            fail->kind = FAIL_DECOMPRESS;
            fail->message = ZSTD_getErrorName(n);
            return -1;
        }
        produced = (long long)n;
    }
    if (produced != expected) {
        fail->kind = FAIL_LENGTH;
        fail->length = produced;
        return -1;
    }
    return 0;
}

static PyObject *failure_tuple(const range_spec *spec, const failure *fail) {
    const char *kind;
    PyObject *detail;
    switch (fail->kind) {
    case FAIL_CRC:
        kind = "crc";
        detail = PyUnicode_FromString("");
        break;
    case FAIL_DECOMPRESS:
        kind = "decompress";
        if (fail->message != NULL)
            detail = PyUnicode_FromFormat("zstd: %s", fail->message);
        else
            detail = PyUnicode_FromFormat("lz4: malformed block (error %d)", fail->code);
        break;
    default:
        kind = "length";
        detail = PyLong_FromLongLong(fail->length);
        break;
    }
    if (detail == NULL)
        return NULL;
    (void)spec;
    return Py_BuildValue("(nsIIN)", fail->position, kind, (unsigned int)fail->stored,
                         (unsigned int)fail->computed, detail);
}

/* ------------------------------------------------------------------------------------------
 * Argument handling. */

typedef struct {
    Py_buffer raw;
    Py_buffer bounds_view;
    int have_raw;
    int have_bounds_view;
    uint64_t *bounds_copy; /* bounds given as a list */
} held_arguments;

static void release_arguments(held_arguments *held) {
    if (held->have_raw)
        PyBuffer_Release(&held->raw);
    if (held->have_bounds_view)
        PyBuffer_Release(&held->bounds_view);
    PyMem_Free(held->bounds_copy);
}

static int is_u64_format(const char *format) {
    if (format == NULL)
        return 0; /* unsigned bytes: not 8-byte integers */
    if (*format == '<' || *format == '=' || *format == '@')
        format++;
    return (format[0] == 'Q' || format[0] == 'L') && format[1] == '\0';
}

static int load_bounds(PyObject *bounds, held_arguments *held, range_spec *spec) {
    if (PyList_Check(bounds) || PyTuple_Check(bounds)) {
        Py_ssize_t size = PySequence_Fast_GET_SIZE(bounds);
        PyObject **items = PySequence_Fast_ITEMS(bounds);
        held->bounds_copy = PyMem_Malloc(sizeof(uint64_t) * (size_t)(size ? size : 1));
        if (held->bounds_copy == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < size; i++) {
            unsigned long long value = PyLong_AsUnsignedLongLong(items[i]);
            if (value == (unsigned long long)-1 && PyErr_Occurred())
                return -1;
            held->bounds_copy[i] = value;
        }
        spec->bounds = held->bounds_copy;
        spec->count = size - 1;
        return 0;
    }
    if (PyObject_GetBuffer(bounds, &held->bounds_view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    held->have_bounds_view = 1;
    if (held->bounds_view.itemsize != 8 || !is_u64_format(held->bounds_view.format)) {
        PyErr_Format(PyExc_TypeError, "bounds must hold u64 values (format Q), not format %s",
                     held->bounds_view.format ? held->bounds_view.format : "B");
        return -1;
    }
    spec->bounds = (const uint64_t *)held->bounds_view.buf;
    spec->count = held->bounds_view.len / 8 - 1;
    return 0;
}

/* Parse and check the arguments common to both entry points. */
static int load_range(PyObject *raw, PyObject *bounds, Py_ssize_t block_size,
                      Py_ssize_t last_block_size, int algo, Py_ssize_t crc_size, int check_crc,
                      held_arguments *held, range_spec *spec) {
    if (PyObject_GetBuffer(raw, &held->raw, PyBUF_SIMPLE) < 0)
        return -1;
    held->have_raw = 1;
    spec->raw = (const uint8_t *)held->raw.buf;
    spec->raw_size = held->raw.len;
    if (load_bounds(bounds, held, spec) < 0)
        return -1;

    if (spec->count < 1) {
        PyErr_SetString(PyExc_ValueError, "bounds must hold at least two offsets (one block)");
        return -1;
    }
    if (block_size < 1 || block_size > MAX_BLOCK_SIZE || last_block_size < 1 ||
        last_block_size > block_size) {
        PyErr_Format(PyExc_ValueError, "bad block sizes %zd / %zd (last)", block_size,
                     last_block_size);
        return -1;
    }
    if (algo != ALGO_LZ4 && algo != ALGO_ZSTD) {
        PyErr_Format(PyExc_ValueError, "algo must be 1 (lz4) or 2 (zstd), not %d", algo);
        return -1;
    }
    if (crc_size != 0 && crc_size != 4) {
        PyErr_Format(PyExc_ValueError, "crc_size must be 0 or 4, not %zd", crc_size);
        return -1;
    }
    for (Py_ssize_t i = 0; i < spec->count; i++) {
        uint64_t start = spec->bounds[i], stop = spec->bounds[i + 1];
        if (stop < start || stop - start <= (uint64_t)crc_size) {
            PyErr_Format(PyExc_ValueError,
                         "block %zd has bounds %llu..%llu: too short for its CRC", i,
                         (unsigned long long)start, (unsigned long long)stop);
            return -1;
        }
    }
    if (spec->bounds[spec->count] - spec->bounds[0] > (uint64_t)spec->raw_size) {
        PyErr_Format(PyExc_ValueError, "bounds span %llu bytes but raw holds %zd",
                     (unsigned long long)(spec->bounds[spec->count] - spec->bounds[0]),
                     spec->raw_size);
        return -1;
    }
    spec->block_size = block_size;
    spec->last_block_size = last_block_size;
    spec->algo = algo;
    spec->crc_size = crc_size;
    spec->check_crc = check_crc;
    return 0;
}

static ZSTD_DCtx *dctx_for(const range_spec *spec) {
    if (spec->algo != ALGO_ZSTD)
        return NULL;
    ZSTD_DCtx *dctx = thread_dctx();
    if (dctx == NULL)
        PyErr_NoMemory();
    return dctx;
}

/* ------------------------------------------------------------------------------------------
 * decode_blocks(raw, bounds, block_size, last_block_size, algo, crc_size, check_crc, out) */

PyDoc_STRVAR(decode_blocks_doc,
             "decode_blocks(raw, bounds, block_size, last_block_size, algo, crc_size, check_crc, "
             "out, /)\n--\n\n"
             "Check and decompress the n blocks of `raw` into the writable buffer `out`, block i "
             "at i * block_size.\n\nReturns None, or (position, kind, stored_crc, computed_crc, "
             "detail) for the first bad block; kind is 'crc', 'decompress' or 'length'.");

static PyObject *decode_blocks(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "decode_blocks takes 8 arguments, got %zd", nargs);
        return NULL;
    }
    Py_ssize_t block_size = PyLong_AsSsize_t(args[2]);
    Py_ssize_t last_block_size = PyLong_AsSsize_t(args[3]);
    int algo = PyLong_AsLong(args[4]);
    Py_ssize_t crc_size = PyLong_AsSsize_t(args[5]);
    int check_crc = PyObject_IsTrue(args[6]);
    if (PyErr_Occurred())
        return NULL;

    held_arguments held = {0};
    range_spec spec;
    Py_buffer out;
    PyObject *result = NULL;
    if (load_range(args[0], args[1], block_size, last_block_size, algo, crc_size, check_crc,
                   &held, &spec) < 0)
        goto done;
    if (PyObject_GetBuffer(args[7], &out, PyBUF_WRITABLE) < 0)
        goto done;

    Py_ssize_t needed = (spec.count - 1) * block_size + last_block_size;
    if (out.len < needed) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes; the blocks need %zd", out.len,
                     needed);
        PyBuffer_Release(&out);
        goto done;
    }
    ZSTD_DCtx *dctx = dctx_for(&spec);
    if (spec.algo == ALGO_ZSTD && dctx == NULL) {
        PyBuffer_Release(&out);
        goto done;
    }

    failure fail = {0};
    int status = 0;
    Py_BEGIN_ALLOW_THREADS;
    uint8_t *dst = (uint8_t *)out.buf;
    for (Py_ssize_t i = 0; i < spec.count && status == 0; i++)
        status = decode_one(&spec, dctx, i, dst + i * block_size, &fail);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&out);

    if (status == 0)
        result = Py_NewRef(Py_None);
    else
        result = failure_tuple(&spec, &fail);
done:
    release_arguments(&held);
    return result;
}

/* ------------------------------------------------------------------------------------------
 * read_range(raw, bounds, block_size, last_block_size, algo, crc_size, check_crc, head,
 *            length) */

PyDoc_STRVAR(read_range_doc,
             "read_range(raw, bounds, block_size, last_block_size, algo, crc_size, check_crc, "
             "head, length, /)\n--\n\n"
             "Check and decompress the n blocks of `raw` and return the `length` bytes that start "
             "`head` bytes into the first block, as new bytes.\n\nBlocks wholly inside the "
             "requested range decompress straight into the result; the partial first and last "
             "blocks go through a scratch block. Returns the failure tuple of decode_blocks "
             "instead for a bad block.");

static PyObject *read_range(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 9) {
        PyErr_Format(PyExc_TypeError, "read_range takes 9 arguments, got %zd", nargs);
        return NULL;
    }
    Py_ssize_t block_size = PyLong_AsSsize_t(args[2]);
    Py_ssize_t last_block_size = PyLong_AsSsize_t(args[3]);
    int algo = PyLong_AsLong(args[4]);
    Py_ssize_t crc_size = PyLong_AsSsize_t(args[5]);
    int check_crc = PyObject_IsTrue(args[6]);
    Py_ssize_t head = PyLong_AsSsize_t(args[7]);
    Py_ssize_t length = PyLong_AsSsize_t(args[8]);
    if (PyErr_Occurred())
        return NULL;

    held_arguments held = {0};
    range_spec spec;
    PyObject *result = NULL;
    uint8_t *scratch = NULL;
    if (load_range(args[0], args[1], block_size, last_block_size, algo, crc_size, check_crc,
                   &held, &spec) < 0)
        goto done;

    Py_ssize_t span = (spec.count - 1) * block_size + last_block_size;
    if (head < 0 || head >= block_size || length < 1 || head + length > span) {
        PyErr_Format(PyExc_ValueError,
                     "head %zd and length %zd do not fit the %zd blocks (%zd bytes)", head,
                     length, spec.count, span);
        goto done;
    }
    ZSTD_DCtx *dctx = dctx_for(&spec);
    if (spec.algo == ALGO_ZSTD && dctx == NULL)
        goto done;
    PyObject *data = PyBytes_FromStringAndSize(NULL, length);
    if (data == NULL)
        goto done;
    scratch = PyMem_Malloc((size_t)block_size);
    if (scratch == NULL) {
        Py_DECREF(data);
        PyErr_NoMemory();
        goto done;
    }

    failure fail = {0};
    int status = 0;
    Py_BEGIN_ALLOW_THREADS;
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(data);
    Py_ssize_t stop = head + length; /* in the decompressed span */
    for (Py_ssize_t i = 0; i < spec.count && status == 0; i++) {
        Py_ssize_t start = i * block_size;
        Py_ssize_t end = start + (i == spec.count - 1 ? last_block_size : block_size);
        if (start >= head && end <= stop) {
            status = decode_one(&spec, dctx, i, dst + (start - head), &fail);
        } else {
            status = decode_one(&spec, dctx, i, scratch, &fail);
            Py_ssize_t from = start > head ? start : head;
            Py_ssize_t to = end < stop ? end : stop;
            if (status == 0 && to > from)
                memcpy(dst + (from - head), scratch + (from - start), (size_t)(to - from));
        }
    }
    Py_END_ALLOW_THREADS;

    if (status == 0) {
        result = data;
    } else {
        Py_DECREF(data);
        result = failure_tuple(&spec, &fail);
    }
done:
    PyMem_Free(scratch);
    release_arguments(&held);
    return result;
}

/* ------------------------------------------------------------------------------------------
 * crc32c(data, seed=0, portable=False): for tests and benchmarks. */

PyDoc_STRVAR(crc32c_doc, "crc32c(data, seed=0, portable=False)\n--\n\n"
                         "Raw CRC32C of `data` from `seed` (no inversion in or out); with "
                         "`portable`, the table-driven code instead of the hardware one.");

static PyObject *crc32c(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *keywords[] = {"data", "seed", "portable", NULL};
    Py_buffer data;
    unsigned int seed = 0;
    int portable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|Ip", keywords, &data, &seed, &portable))
        return NULL;
    uint32_t crc;
    crc_function function = portable ? crc32c_portable : crc32c_fast;
    Py_BEGIN_ALLOW_THREADS;
    crc = function(seed, (const uint8_t *)data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

/* ------------------------------------------------------------------------------------------
 * The module. */

static PyMethodDef methods[] = {
    {"decode_blocks", (PyCFunction)(void (*)(void))decode_blocks, METH_FASTCALL,
     decode_blocks_doc},
    {"read_range", (PyCFunction)(void (*)(void))read_range, METH_FASTCALL, read_range_doc},
    {"crc32c", (PyCFunction)(void (*)(void))crc32c, METH_VARARGS | METH_KEYWORDS, crc32c_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "workbench.formats._zfile_native",
    "Native hot loop of the ZFile reader: CRC32C check and lz4/zstd decompression of a run of "
    "blocks without the GIL. See _zfile_native.c for the contract.",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__zfile_native(void) {
    crc_select();
    if (!dctx_key_ready) {
        if (pthread_key_create(&dctx_key, dctx_free) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "cannot create the zstd context thread key");
            return NULL;
        }
        dctx_key_ready = 1;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddStringConstant(module, "CRC32C_IMPLEMENTATION", crc_implementation) < 0 ||
        PyModule_AddStringConstant(module, "LZ4_VERSION", LZ4_versionString()) < 0 ||
        PyModule_AddStringConstant(module, "ZSTD_VERSION", ZSTD_versionString()) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
