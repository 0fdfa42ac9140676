/*
 * A fake libnvidia-ml.so.1 for the probe's GPU tests.
 *
 * pynvml loads it like the real library (tests point `library_path` at it), so the probe's real NVML code
 * path runs: ctypes calls, struct layouts, error codes. Every call re-reads the state file named by the
 * environment variable FAKE_NVML_STATE, so a test changes the "hardware" by rewriting that file (atomically)
 * and the next call sees it. Lines are `key=value`:
 *
 *   init=ok | driver_not_loaded | lib_error | no_permission | <NVML error number>   what nvmlInit returns
 *   driver=550.54.15          nvmlSystemGetDriverVersion
 *   cuda=12040                nvmlSystemGetCudaDriverVersion(_v2)
 *   v2=1 | 0                  0: nvmlDeviceGetMemoryInfo_v2 answers NVML_ERROR_FUNCTION_NOT_FOUND (old driver)
 *   hang_ms=5000              memory queries sleep this long (a wedged driver); the sleep ends early once the
 *                             state file no longer sets hang_ms, so a test can end the hang
 *   lost=1                    memory queries answer NVML_ERROR_GPU_IS_LOST
 *   gpuN=UUID,NAME,TOTAL,USED physical GPU N (N = 0, 1, ... in order)
 *   migN.M=UUID,TOTAL,USED[,NAME]  MIG instance M on GPU N; a GPU with instances has MIG mode enabled
 *
 * Besides the NVML symbols it exports counters for tests: fakeNvmlInitCount() (nvmlInit calls that succeeded
 * and are not yet matched by nvmlShutdown: the probe must never leave NVML initialised), fakeNvmlInitAttempts()
 * (every nvmlInit call, failed or not: proves retries) and fakeNvmlMemoryCalls(1|2) (calls of
 * nvmlDeviceGetMemoryInfo / _v2: proves the v1 fallback is remembered).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NO_PERMISSION 4
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_FUNCTION_NOT_FOUND 13
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_LIB_RM_VERSION_MISMATCH 18
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_UNKNOWN 999

#define MAX_GPUS 8
#define MAX_MIGS 7
#define NVML_MEMORY_V2 0x02000028u

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

/* A handle points at one of these; it names a slot, and the slot's data is looked up in the current state. */
typedef struct fake_handle {
    int gpu;
    int mig; /* -1 for the physical GPU */
} *nvmlDevice_t;

static struct fake_handle gpu_handles[MAX_GPUS];
static struct fake_handle mig_handles[MAX_GPUS][MAX_MIGS];

struct dev {
    int present;
    char uuid[96];
    char name[96];
    unsigned long long total, used;
};

struct state {
    char init[32];
    char driver[80];
    int cuda;
    int v2;
    long hang_ms;
    int lost;
    int ngpus;
    struct dev gpu[MAX_GPUS];
    struct dev mig[MAX_GPUS][MAX_MIGS];
};

/* Accessed with __atomic builtins: the probe calls NVML from several threads. */
static int init_count;
static int init_attempts;
static int memory_v1_calls;
static int memory_v2_calls;

__attribute__((constructor)) static void setup_handles(void) {
    for (int g = 0; g < MAX_GPUS; g++) {
        gpu_handles[g].gpu = g;
        gpu_handles[g].mig = -1;
        for (int m = 0; m < MAX_MIGS; m++) {
            mig_handles[g][m].gpu = g;
            mig_handles[g][m].mig = m;
        }
    }
}

static void copy_field(char *dst, size_t size, const char *src) {
    snprintf(dst, size, "%s", src ? src : "");
}

/* Split "a,b,c" in place into at most `max` fields; returns the number of fields. */
static int split_fields(char *s, char **fields, int max) {
    int n = 0;
    char *save = NULL;
    for (char *tok = strtok_r(s, ",", &save); tok && n < max; tok = strtok_r(NULL, ",", &save)) {
        fields[n++] = tok;
    }
    return n;
}

static void load_state(struct state *s) {
    memset(s, 0, sizeof(*s));
    copy_field(s->init, sizeof(s->init), "ok");
    copy_field(s->driver, sizeof(s->driver), "550.54.15");
    s->cuda = 12040;
    s->v2 = 1;
    const char *path = getenv("FAKE_NVML_STATE");
    if (!path) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\r\n")] = 0;
        char *eq = strchr(line, '=');
        if (!eq) continue;
        *eq = 0;
        const char *key = line;
        char *val = eq + 1;
        int g, m;
        char *fields[4];
        if (strcmp(key, "init") == 0) {
            copy_field(s->init, sizeof(s->init), val);
        } else if (strcmp(key, "driver") == 0) {
            copy_field(s->driver, sizeof(s->driver), val);
        } else if (strcmp(key, "cuda") == 0) {
            s->cuda = atoi(val);
        } else if (strcmp(key, "v2") == 0) {
            s->v2 = atoi(val);
        } else if (strcmp(key, "hang_ms") == 0) {
            s->hang_ms = atol(val);
        } else if (strcmp(key, "lost") == 0) {
            s->lost = atoi(val);
        } else if (sscanf(key, "mig%d.%d", &g, &m) == 2) {
            if (g < 0 || g >= MAX_GPUS || m < 0 || m >= MAX_MIGS) continue;
            int n = split_fields(val, fields, 4);
            if (n < 3) continue;
            struct dev *d = &s->mig[g][m];
            d->present = 1;
            copy_field(d->uuid, sizeof(d->uuid), fields[0]);
            d->total = strtoull(fields[1], NULL, 10);
            d->used = strtoull(fields[2], NULL, 10);
            copy_field(d->name, sizeof(d->name), n > 3 ? fields[3] : "");
        } else if (sscanf(key, "gpu%d", &g) == 1) {
            if (g < 0 || g >= MAX_GPUS) continue;
            int n = split_fields(val, fields, 4);
            if (n < 4) continue;
            struct dev *d = &s->gpu[g];
            d->present = 1;
            copy_field(d->uuid, sizeof(d->uuid), fields[0]);
            copy_field(d->name, sizeof(d->name), fields[1]);
            d->total = strtoull(fields[2], NULL, 10);
            d->used = strtoull(fields[3], NULL, 10);
        }
    }
    fclose(f);
    /* GPUs are numbered densely like NVML's indices: the count stops at the first gap. */
    while (s->ngpus < MAX_GPUS && s->gpu[s->ngpus].present) s->ngpus++;
    /* A MIG instance without its own name gets "<parent> MIG", as real NVML reports e.g. "... MIG 1g.10gb". */
    for (int g = 0; g < MAX_GPUS; g++)
        for (int m = 0; m < MAX_MIGS; m++)
            if (s->mig[g][m].present && !s->mig[g][m].name[0])
                snprintf(s->mig[g][m].name, sizeof(s->mig[g][m].name), "%.80s MIG", s->gpu[g].name);
}

static int initialised(void) {
    return __atomic_load_n(&init_count, __ATOMIC_SEQ_CST) > 0;
}

static int mig_enabled(const struct state *s, int g) {
    for (int m = 0; m < MAX_MIGS; m++)
        if (s->mig[g][m].present) return 1;
    return 0;
}

/* Look up the device a handle names in the current state; NULL if it no longer exists. */
static const struct dev *lookup(const struct state *s, nvmlDevice_t h) {
    if (!h || h->gpu < 0 || h->gpu >= s->ngpus) return NULL;
    if (h->mig < 0) return &s->gpu[h->gpu];
    if (h->mig >= MAX_MIGS || !s->mig[h->gpu][h->mig].present) return NULL;
    return &s->mig[h->gpu][h->mig];
}

static nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------------------------------------ init */

static nvmlReturn_t do_init(void) {
    __atomic_add_fetch(&init_attempts, 1, __ATOMIC_SEQ_CST);
    struct state s;
    load_state(&s);
    if (strcmp(s.init, "ok") == 0) {
        __atomic_add_fetch(&init_count, 1, __ATOMIC_SEQ_CST);
        return NVML_SUCCESS;
    }
    if (strcmp(s.init, "driver_not_loaded") == 0) return NVML_ERROR_DRIVER_NOT_LOADED;
    if (strcmp(s.init, "lib_error") == 0) return NVML_ERROR_LIB_RM_VERSION_MISMATCH;
    if (strcmp(s.init, "no_permission") == 0) return NVML_ERROR_NO_PERMISSION;
    int code = atoi(s.init);
    return code > 0 ? code : NVML_ERROR_UNKNOWN;
}

nvmlReturn_t nvmlInit_v2(void) { return do_init(); }

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return do_init();
}

nvmlReturn_t nvmlShutdown(void) {
    int cur = __atomic_load_n(&init_count, __ATOMIC_SEQ_CST);
    while (cur > 0) {
        if (__atomic_compare_exchange_n(&init_count, &cur, cur - 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return NVML_SUCCESS;
    }
    return NVML_ERROR_UNINITIALIZED;
}

int fakeNvmlInitCount(void) { return __atomic_load_n(&init_count, __ATOMIC_SEQ_CST); }
int fakeNvmlInitAttempts(void) { return __atomic_load_n(&init_attempts, __ATOMIC_SEQ_CST); }
int fakeNvmlMemoryCalls(int version) {
    return __atomic_load_n(version == 2 ? &memory_v2_calls : &memory_v1_calls, __ATOMIC_SEQ_CST);
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

/* ---------------------------------------------------------------------------------------------- system */

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    struct state s;
    load_state(&s);
    return copy_string(version, length, s.driver);
}

static nvmlReturn_t cuda_version(int *out) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    struct state s;
    load_state(&s);
    *out = s.cuda;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) { return cuda_version(v); }
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return cuda_version(v); }

/* ---------------------------------------------------------------------------------------------- device */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    struct state s;
    load_state(&s);
    *count = (unsigned int)s.ngpus;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    struct state s;
    load_state(&s);
    if (!device || index >= (unsigned int)s.ngpus) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &gpu_handles[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    struct state s;
    load_state(&s);
    for (int g = 0; g < s.ngpus; g++) {
        if (strcmp(s.gpu[g].uuid, uuid) == 0) {
            *device = &gpu_handles[g];
            return NVML_SUCCESS;
        }
        for (int m = 0; m < MAX_MIGS; m++) {
            if (s.mig[g][m].present && strcmp(s.mig[g][m].uuid, uuid) == 0) {
                *device = &mig_handles[g][m];
                return NVML_SUCCESS;
            }
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    struct state s;
    load_state(&s);
    const struct dev *d = lookup(&s, device);
    if (!d) return NVML_ERROR_INVALID_ARGUMENT;
    return copy_string(name, length, d->name);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    struct state s;
    load_state(&s);
    const struct dev *d = lookup(&s, device);
    if (!d) return NVML_ERROR_INVALID_ARGUMENT;
    return copy_string(uuid, length, d->uuid);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    struct state s;
    load_state(&s);
    if (!lookup(&s, device) || !index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = (unsigned int)device->gpu;
    return NVML_SUCCESS;
}

/* A wedged driver: sleep in 20 ms steps until hang_ms has passed or the test drops hang_ms from the state. */
static void maybe_hang(void) {
    struct state s;
    load_state(&s);
    if (s.hang_ms <= 0) return;
    struct timespec start, now, step = {0, 20 * 1000 * 1000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        nanosleep(&step, NULL);
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed_ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        load_state(&s);
        if (s.hang_ms <= 0 || elapsed_ms >= s.hang_ms) return;
    }
}

static nvmlReturn_t memory(nvmlDevice_t device, unsigned long long *total, unsigned long long *free,
                           unsigned long long *used) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    maybe_hang();
    struct state s;
    load_state(&s);
    if (s.lost) return NVML_ERROR_GPU_IS_LOST;
    const struct dev *d = lookup(&s, device);
    if (!d) return NVML_ERROR_INVALID_ARGUMENT;
    *total = d->total;
    *used = d->used;
    *free = d->used < d->total ? d->total - d->used : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *mem) {
    __atomic_add_fetch(&memory_v1_calls, 1, __ATOMIC_SEQ_CST);
    if (!mem) return NVML_ERROR_INVALID_ARGUMENT;
    return memory(device, &mem->total, &mem->free, &mem->used);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *mem) {
    __atomic_add_fetch(&memory_v2_calls, 1, __ATOMIC_SEQ_CST);
    struct state s;
    load_state(&s);
    /* The symbol cannot be un-exported at run time; an old driver's answer is FUNCTION_NOT_FOUND. */
    if (!s.v2) return NVML_ERROR_FUNCTION_NOT_FOUND;
    if (!mem) return NVML_ERROR_INVALID_ARGUMENT;
    if (mem->version != NVML_MEMORY_V2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    mem->reserved = 0;
    return memory(device, &mem->total, &mem->free, &mem->used);
}

/* ------------------------------------------------------------------------------------------------- MIG */

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    struct state s;
    load_state(&s);
    if (!lookup(&s, device) || !current || !pending) return NVML_ERROR_INVALID_ARGUMENT;
    if (device->mig >= 0) return NVML_ERROR_NOT_SUPPORTED;
    *current = *pending = (unsigned int)mig_enabled(&s, device->gpu);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    struct state s;
    load_state(&s);
    if (!lookup(&s, device) || !count || device->mig >= 0) return NVML_ERROR_INVALID_ARGUMENT;
    *count = mig_enabled(&s, device->gpu) ? MAX_MIGS : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *mig) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    struct state s;
    load_state(&s);
    if (!lookup(&s, device) || !mig || device->mig >= 0 || index >= MAX_MIGS) return NVML_ERROR_INVALID_ARGUMENT;
    if (!s.mig[device->gpu][index].present) return NVML_ERROR_NOT_FOUND;
    *mig = &mig_handles[device->gpu][index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *is_mig) {
    if (!initialised()) return NVML_ERROR_UNINITIALIZED;
    struct state s;
    load_state(&s);
    if (!lookup(&s, device) || !is_mig) return NVML_ERROR_INVALID_ARGUMENT;
    *is_mig = device->mig >= 0;
    return NVML_SUCCESS;
}
