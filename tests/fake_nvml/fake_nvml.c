/*
 * A stand-in libnvidia-ml.so.1 for tests: the real pynvml loads it through
 * LD_LIBRARY_PATH and cannot tell it from a driver's NVML.
 *
 * Every call re-reads the state named by $FLUXGYMD_FAKE_NVML_STATE plus every file in
 * "<state>.d/" (one per PID, written atomically by the stand-in trainer), so tests change
 * the "GPU" while a monitor runs. Line format (whitespace separated, '#' comments):
 *
 *   device <index> <uuid> <gpu_util_percent> <mem_total_bytes> <mem_used_bytes> <name...>
 *   proc <pid> <device_index> <sm_util_percent> <used_mem_bytes>
 *   fault process_util_not_supported
 *   fault gpu_lost <device_index>
 *   fault block <nvmlFunctionName>
 *   fault no_driver
 *
 * If $FLUXGYMD_FAKE_NVML_CALL_LOG names a file, each entry point appends its name there
 * (one O_APPEND write per call), so tests can count calls, e.g. that a hung call was not
 * started twice.
 *
 * Struct layouts and return codes follow NVIDIA's nvml.h (declared here by hand; the header
 * is not vendored). Build with -DNO_PROCESS_UTIL to leave out
 * nvmlDeviceGetProcessUtilization, as on an old driver.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define API __attribute__((visibility("default")))

/* nvmlReturn_t values (nvml.h) */
typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

/* Public struct layouts (nvml.h) */
typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;
#define NVML_STRUCT_VERSION(size, ver) ((unsigned int)(size) | ((unsigned int)(ver) << 24U))
#define nvmlMemory_v2 NVML_STRUCT_VERSION(sizeof(nvmlMemory_v2_t), 2)

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_v2_t; /* also nvmlProcessInfo_t, used by the _v3 entry point */

typedef struct {
    unsigned int pid;
    unsigned long long timeStamp; /* CPU time, microseconds since the epoch */
    unsigned int smUtil;
    unsigned int memUtil;
    unsigned int encUtil;
    unsigned int decUtil;
} nvmlProcessUtilizationSample_t;

/* Opaque to callers; a device handle points into a static table. */
struct nvmlDevice_st {
    unsigned int index;
};
typedef struct nvmlDevice_st *nvmlDevice_t;

#define MAX_DEVICES 64
#define MAX_PROCS 1024
#define UUID_LEN 96
#define NAME_LEN 96
#define FN_LEN 96
#define MAX_BLOCKS 16

typedef struct {
    unsigned int index;
    char uuid[UUID_LEN];
    char name[NAME_LEN];
    unsigned int util;
    unsigned long long mem_total;
    unsigned long long mem_used;
    int lost;
} fake_device;

typedef struct {
    unsigned int pid;
    unsigned int device;
    unsigned int sm;
    unsigned long long mem;
} fake_proc;

typedef struct {
    fake_device devices[MAX_DEVICES];
    int n_devices;
    fake_proc procs[MAX_PROCS];
    int n_procs;
    int process_util_not_supported;
    int no_driver;
    char blocked[MAX_BLOCKS][FN_LEN];
    int n_blocked;
    unsigned int lost[MAX_DEVICES]; /* indices from "fault gpu_lost", in any line order */
    int n_lost;
} fake_state;

static struct nvmlDevice_st g_handles[MAX_DEVICES];
static int g_init_count; /* nvmlInit* minus nvmlShutdown; calls need > 0 */

static void log_call(const char *fn) {
    const char *path = getenv("FLUXGYMD_FAKE_NVML_CALL_LOG");
    if (path == NULL || *path == '\0') return;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    char line[FN_LEN + 2];
    int n = snprintf(line, sizeof line, "%s\n", fn);
    if (n > 0) {
        ssize_t ignored = write(fd, line, (size_t)n);
        (void)ignored;
    }
    close(fd);
}

static void parse_line(fake_state *st, char *line) {
    char *hash = strchr(line, '#');
    if (hash) *hash = '\0';
    char *save = NULL;
    char *kind = strtok_r(line, " \t\r\n", &save);
    if (kind == NULL) return;
    if (strcmp(kind, "device") == 0 && st->n_devices < MAX_DEVICES) {
        fake_device d;
        memset(&d, 0, sizeof d);
        char *idx = strtok_r(NULL, " \t\r\n", &save);
        char *uuid = strtok_r(NULL, " \t\r\n", &save);
        char *util = strtok_r(NULL, " \t\r\n", &save);
        char *total = strtok_r(NULL, " \t\r\n", &save);
        char *used = strtok_r(NULL, " \t\r\n", &save);
        char *name = strtok_r(NULL, "\r\n", &save); /* the rest, spaces included */
        if (!idx || !uuid || !util || !total || !used) return; /* torn or bad line */
        while (name && (*name == ' ' || *name == '\t')) name++;
        d.index = (unsigned int)strtoul(idx, NULL, 10);
        snprintf(d.uuid, sizeof d.uuid, "%s", uuid);
        snprintf(d.name, sizeof d.name, "%s", (name && *name) ? name : "Fake GPU");
        size_t nl = strlen(d.name);
        while (nl > 0 && (d.name[nl - 1] == ' ' || d.name[nl - 1] == '\t')) d.name[--nl] = '\0';
        d.util = (unsigned int)strtoul(util, NULL, 10);
        d.mem_total = strtoull(total, NULL, 10);
        d.mem_used = strtoull(used, NULL, 10);
        st->devices[st->n_devices++] = d;
    } else if (strcmp(kind, "proc") == 0 && st->n_procs < MAX_PROCS) {
        char *pid = strtok_r(NULL, " \t\r\n", &save);
        char *dev = strtok_r(NULL, " \t\r\n", &save);
        char *sm = strtok_r(NULL, " \t\r\n", &save);
        char *mem = strtok_r(NULL, " \t\r\n", &save);
        if (!pid || !dev || !sm || !mem) return;
        fake_proc p = {(unsigned int)strtoul(pid, NULL, 10), (unsigned int)strtoul(dev, NULL, 10),
                       (unsigned int)strtoul(sm, NULL, 10), strtoull(mem, NULL, 10)};
        st->procs[st->n_procs++] = p;
    } else if (strcmp(kind, "fault") == 0) {
        char *what = strtok_r(NULL, " \t\r\n", &save);
        char *arg = strtok_r(NULL, " \t\r\n", &save);
        if (what == NULL) return;
        if (strcmp(what, "process_util_not_supported") == 0) {
            st->process_util_not_supported = 1;
        } else if (strcmp(what, "no_driver") == 0) {
            st->no_driver = 1;
        } else if (strcmp(what, "gpu_lost") == 0 && arg) {
            /* devices may come after the fault (or in another file): applied after the read */
            if (st->n_lost < MAX_DEVICES) st->lost[st->n_lost++] = (unsigned int)strtoul(arg, NULL, 10);
        } else if (strcmp(what, "block") == 0 && arg && st->n_blocked < MAX_BLOCKS) {
            snprintf(st->blocked[st->n_blocked++], FN_LEN, "%s", arg);
        }
    }
}

static void read_file(fake_state *st, const char *path) {
    FILE *f = fopen(path, "re");
    if (f == NULL) return;
    char line[512];
    while (fgets(line, sizeof line, f)) parse_line(st, line);
    fclose(f);
}

/* Reads the whole state afresh: no caching, so tests may change it between calls. */
static void load_state(fake_state *st) {
    memset(st, 0, sizeof *st);
    const char *path = getenv("FLUXGYMD_FAKE_NVML_STATE");
    if (path == NULL || *path == '\0') return;
    read_file(st, path);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s.d", path);
    DIR *d = opendir(dir);
    if (d != NULL) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            /* skip dot files and temporaries of writers that rename into place */
            if (e->d_name[0] == '.') continue;
            size_t n = strlen(e->d_name);
            if (n >= 4 && strcmp(e->d_name + n - 4, ".tmp") == 0) continue;
            char file[8192];
            snprintf(file, sizeof file, "%s/%s", dir, e->d_name);
            read_file(st, file);
        }
        closedir(d);
    }
    for (int l = 0; l < st->n_lost; l++)
        for (int i = 0; i < st->n_devices; i++)
            if (st->devices[i].index == st->lost[l]) st->devices[i].lost = 1;
}

static int is_blocked(const fake_state *st, const char *fn) {
    for (int b = 0; b < st->n_blocked; b++)
        if (strcmp(st->blocked[b], fn) == 0) return 1;
    return 0;
}

/* Logs the call, then hangs like a driver after an Xid for as long as the state says
 * "fault block <fn>"; the state is re-read so a test can release the call. */
static void enter(const char *fn, fake_state *st) {
    log_call(fn);
    load_state(st);
    while (is_blocked(st, fn)) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        load_state(st);
    }
}

static fake_device *find_index(fake_state *st, unsigned int index) {
    for (int i = 0; i < st->n_devices; i++)
        if (st->devices[i].index == index) return &st->devices[i];
    return NULL;
}

/* Validates a handle against the current state: the common prologue of device calls. */
static nvmlReturn_t device_of(fake_state *st, nvmlDevice_t handle, fake_device **out) {
    if (g_init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    if (handle == NULL || handle < &g_handles[0] || handle >= &g_handles[MAX_DEVICES])
        return NVML_ERROR_INVALID_ARGUMENT;
    fake_device *d = find_index(st, handle->index);
    if (d == NULL || d->lost) return NVML_ERROR_GPU_IS_LOST; /* gone from the bus */
    *out = d;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src) {
    if (dst == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

/* ---- init / shutdown ---------------------------------------------------------------- */

static nvmlReturn_t do_init(const char *fn) {
    fake_state st;
    enter(fn, &st);
    if (st.no_driver) return NVML_ERROR_DRIVER_NOT_LOADED;
    g_init_count++;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlInit_v2(void) { return do_init("nvmlInit_v2"); }
API nvmlReturn_t nvmlInit(void) { return do_init("nvmlInit"); }
API nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return do_init("nvmlInitWithFlags");
}

API nvmlReturn_t nvmlShutdown(void) {
    fake_state st;
    enter("nvmlShutdown", &st);
    if (g_init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    g_init_count--;
    return NVML_SUCCESS;
}

API const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

/* ---- system ------------------------------------------------------------------------- */

API nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    fake_state st;
    enter("nvmlSystemGetDriverVersion", &st);
    if (g_init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    return copy_string(version, length, "999.99.99-fake");
}

API nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    fake_state st;
    enter("nvmlSystemGetNVMLVersion", &st);
    return copy_string(version, length, "13.999.99-fake");
}

/* ---- device discovery --------------------------------------------------------------- */

API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    fake_state st;
    enter("nvmlDeviceGetCount_v2", &st);
    if (g_init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *count = (unsigned int)st.n_devices;
    return NVML_SUCCESS;
}

static nvmlReturn_t handle_for(fake_state *st, fake_device *d, nvmlDevice_t *device) {
    if (d->index >= MAX_DEVICES) return NVML_ERROR_UNKNOWN;
    if (d->lost) return NVML_ERROR_GPU_IS_LOST;
    g_handles[d->index].index = d->index;
    *device = &g_handles[d->index];
    (void)st;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    fake_state st;
    enter("nvmlDeviceGetHandleByIndex_v2", &st);
    if (g_init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    if (device == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    fake_device *d = find_index(&st, index);
    if (d == NULL) return NVML_ERROR_INVALID_ARGUMENT; /* index >= count, as NVML says */
    return handle_for(&st, d, device);
}

API nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    fake_state st;
    enter("nvmlDeviceGetHandleByUUID", &st);
    if (g_init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    if (uuid == NULL || device == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < st.n_devices; i++)
        if (strcmp(st.devices[i].uuid, uuid) == 0) return handle_for(&st, &st.devices[i], device);
    return NVML_ERROR_NOT_FOUND;
}

/* ---- device queries ----------------------------------------------------------------- */

#define DEVICE_PROLOGUE(fn)                                                                 \
    fake_state st;                                                                          \
    fake_device *dev = NULL;                                                                \
    enter(fn, &st);                                                                         \
    nvmlReturn_t rc_ = device_of(&st, device, &dev);                                        \
    if (rc_ != NVML_SUCCESS) return rc_;

API nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    DEVICE_PROLOGUE("nvmlDeviceGetIndex")
    if (index == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *index = dev->index;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    DEVICE_PROLOGUE("nvmlDeviceGetUUID")
    return copy_string(uuid, length, dev->uuid);
}

API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    DEVICE_PROLOGUE("nvmlDeviceGetName")
    return copy_string(name, length, dev->name);
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    DEVICE_PROLOGUE("nvmlDeviceGetMemoryInfo")
    if (memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = dev->mem_total;
    memory->used = dev->mem_used;
    memory->free = dev->mem_total > dev->mem_used ? dev->mem_total - dev->mem_used : 0;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    DEVICE_PROLOGUE("nvmlDeviceGetMemoryInfo_v2")
    if (memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    memory->total = dev->mem_total;
    memory->reserved = 0;
    memory->used = dev->mem_used;
    memory->free = dev->mem_total > dev->mem_used ? dev->mem_total - dev->mem_used : 0;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    DEVICE_PROLOGUE("nvmlDeviceGetUtilizationRates")
    if (utilization == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    utilization->gpu = dev->util;
    utilization->memory = dev->mem_total ? (unsigned int)(dev->mem_used * 100 / dev->mem_total) : 0;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensorType, unsigned int *temp) {
    DEVICE_PROLOGUE("nvmlDeviceGetTemperature")
    if (sensorType != 0 || temp == NULL) return NVML_ERROR_INVALID_ARGUMENT; /* 0 = NVML_TEMPERATURE_GPU */
    *temp = 30 + dev->util / 2;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power_mw) {
    DEVICE_PROLOGUE("nvmlDeviceGetPowerUsage")
    if (power_mw == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *power_mw = 50000 + dev->util * 3000;
    return NVML_SUCCESS;
}

/* Compute processes: count query with *infoCount too small (or infos NULL) returns
 * INSUFFICIENT_SIZE and the needed count; SUCCESS with 0 when there are none. */
#define COMPUTE_PROCS(fn, info_type, fill)                                                  \
    API nvmlReturn_t fn(nvmlDevice_t device, unsigned int *infoCount, info_type *infos) {   \
        DEVICE_PROLOGUE(#fn)                                                                \
        if (infoCount == NULL) return NVML_ERROR_INVALID_ARGUMENT;                          \
        unsigned int n = 0;                                                                 \
        for (int i = 0; i < st.n_procs; i++)                                                \
            if (st.procs[i].device == dev->index) n++;                                      \
        if (n == 0) {                                                                       \
            *infoCount = 0;                                                                 \
            return NVML_SUCCESS;                                                            \
        }                                                                                   \
        if (infos == NULL || *infoCount < n) {                                              \
            *infoCount = n;                                                                 \
            return NVML_ERROR_INSUFFICIENT_SIZE;                                            \
        }                                                                                   \
        unsigned int k = 0;                                                                 \
        for (int i = 0; i < st.n_procs; i++) {                                              \
            if (st.procs[i].device != dev->index) continue;                                 \
            info_type *o = &infos[k++];                                                     \
            memset(o, 0, sizeof *o);                                                        \
            o->pid = st.procs[i].pid;                                                       \
            o->usedGpuMemory = st.procs[i].mem;                                             \
            fill;                                                                           \
        }                                                                                   \
        *infoCount = k;                                                                     \
        return NVML_SUCCESS;                                                                \
    }

COMPUTE_PROCS(nvmlDeviceGetComputeRunningProcesses_v3, nvmlProcessInfo_v2_t,
              (o->gpuInstanceId = 0xFFFFFFFFu, o->computeInstanceId = 0xFFFFFFFFu))
COMPUTE_PROCS(nvmlDeviceGetComputeRunningProcesses_v2, nvmlProcessInfo_v2_t,
              (o->gpuInstanceId = 0xFFFFFFFFu, o->computeInstanceId = 0xFFFFFFFFu))
COMPUTE_PROCS(nvmlDeviceGetComputeRunningProcesses, nvmlProcessInfo_v1_t, (void)0)

#ifndef NO_PROCESS_UTIL
/* Like the driver: one sample per process with non-zero SM use in the latest sampling
 * period (100 ms ticks of the wall clock, in microseconds since the epoch); only samples
 * newer than lastSeenTimeStamp; NOT_FOUND when there are none. */
API nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device,
                                                 nvmlProcessUtilizationSample_t *utilization,
                                                 unsigned int *processSamplesCount,
                                                 unsigned long long lastSeenTimeStamp) {
    DEVICE_PROLOGUE("nvmlDeviceGetProcessUtilization")
    if (processSamplesCount == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (st.process_util_not_supported) return NVML_ERROR_NOT_SUPPORTED;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    unsigned long long now_us = (unsigned long long)tv.tv_sec * 1000000ULL + (unsigned long long)tv.tv_usec;
    unsigned long long tick_us = now_us - now_us % 100000ULL;
    unsigned int n = 0;
    if (tick_us > lastSeenTimeStamp)
        for (int i = 0; i < st.n_procs; i++)
            if (st.procs[i].device == dev->index && st.procs[i].sm > 0) n++;
    if (n == 0) return NVML_ERROR_NOT_FOUND;
    if (utilization == NULL || *processSamplesCount < n) {
        *processSamplesCount = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned int k = 0;
    for (int i = 0; i < st.n_procs; i++) {
        if (st.procs[i].device != dev->index || st.procs[i].sm == 0) continue;
        nvmlProcessUtilizationSample_t *o = &utilization[k++];
        memset(o, 0, sizeof *o);
        o->pid = st.procs[i].pid;
        o->timeStamp = tick_us;
        o->smUtil = st.procs[i].sm > 100 ? 100 : st.procs[i].sm;
        o->memUtil = st.procs[i].sm / 2;
    }
    *processSamplesCount = k;
    return NVML_SUCCESS;
}
#endif
