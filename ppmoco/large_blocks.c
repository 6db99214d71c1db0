/* ppmoco's large-block cache: a malloc front, preloaded (LD_PRELOAD) into the training tools where
 * jemalloc is not installed (ppmoco/host_allocator.py).
 *
 * Why: a training step allocates and frees its activations, tens of MB each, every step. glibc's
 * malloc either unmaps such blocks when they are freed (its defaults: every step faults and zeroes
 * them again) or keeps them in its one heap next to small long-lived objects, where they fragment
 * (ppmoco's keep_freed_memory: 1.7x the step's memory). Here blocks of LARGE bytes or more come
 * from one address range of their own, in whole pages, best fit with splitting and coalescing, and
 * freed pages stay resident for the next step's blocks. Everything else (small blocks, alignments
 * above a page, a block the range cannot hold) is glibc's, through its __libc_* entry points; free
 * tells the two apart by address.
 *
 * Bookkeeping lives outside the blocks, in one entry per page of the range: a block's first and last
 * pages carry its length in pages and whether it is free (boundary tags, so a freed block merges with
 * free neighbours in constant time); a free block's first page also links it into the free list of
 * its size class.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t size);
extern void __libc_free(void *ptr);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *ptr, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);

#define PAGE_SHIFT 12
#define PAGE ((size_t)1 << PAGE_SHIFT)
/* glibc's default mmap threshold: glibc keeps what is smaller in its heap without unmapping it. */
#define LARGE ((size_t)128 << 10)
#define NIL UINT32_MAX
/* The range is made usable in steps of this many pages (64 MiB), as the top reaches them. */
#define COMMIT_STEP ((size_t)1 << 14)
/* Size classes: one per page count below 8, then four per doubling. */
#define CLASSES 128

typedef struct {
    uint32_t tag;  /* at a block's first and last page: its pages << 1 | free */
    uint32_t next; /* at a free block's first page: the free list of its class */
    uint32_t prev;
} page_entry;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int ready;                 /* 1: the range is reserved; -1: it cannot be, glibc serves all */
static char *base;                /* the range */
static size_t range_pages;
static page_entry *pages;         /* one entry per page of the range */
static size_t top;                /* pages of the range handed out so far, free or not */
static size_t usable;             /* pages of the range (and their entries) made readable and writable */
static uint32_t free_lists[CLASSES];
static size_t used_pages, free_pages;

static size_t size_class(size_t n)
{
    if (n < 8)
        return n;
    int log = 63 - __builtin_clzl(n);
    return 8 + (size_t)(log - 3) * 4 + ((n >> (log - 2)) & 3);
}

static void mark(uint32_t first, size_t n, int is_free)
{
    uint32_t tag = (uint32_t)(n << 1) | (uint32_t)is_free;
    pages[first].tag = tag;
    pages[first + n - 1].tag = tag;
}

static size_t length(uint32_t first) { return pages[first].tag >> 1; }
static int is_free(uint32_t first) { return pages[first].tag & 1; }

static void push_free(uint32_t first, size_t n)
{
    size_t c = size_class(n);
    mark(first, n, 1);
    pages[first].prev = NIL;
    pages[first].next = free_lists[c];
    if (free_lists[c] != NIL)
        pages[free_lists[c]].prev = first;
    free_lists[c] = first;
    free_pages += n;
}

static void unlink_free(uint32_t first)
{
    size_t n = length(first);
    page_entry *e = &pages[first];
    if (e->prev != NIL)
        pages[e->prev].next = e->next;
    else
        free_lists[size_class(n)] = e->next;
    if (e->next != NIL)
        pages[e->next].prev = e->prev;
    free_pages -= n;
}

/* Reserve the range: twice the machine's memory (at least 16 GiB), halved until the kernel agrees.
 * Inaccessible until the top reaches it (commit_to), so a kernel that accounts every writable page
 * (vm.overcommit_memory=2) counts only what is used. */
static void reserve(void)
{
    long phys = sysconf(_SC_PHYS_PAGES);
    size_t want = phys > 0 ? 2 * (size_t)phys : 0;
    if (want < ((size_t)16 << 30) / PAGE)
        want = ((size_t)16 << 30) / PAGE;
    if (want > NIL / 2)
        want = NIL / 2;
    for (; want >= ((size_t)1 << 30) / PAGE; want /= 2) {
        void *range = mmap(NULL, want * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (range == MAP_FAILED)
            continue;
        void *table = mmap(NULL, want * sizeof(page_entry), PROT_NONE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (table == MAP_FAILED) {
            munmap(range, want * PAGE);
            continue;
        }
        base = range;
        pages = table;
        range_pages = want;
        for (size_t c = 0; c < CLASSES; c++)
            free_lists[c] = NIL;
        ready = 1;
        return;
    }
    ready = -1;
}

/* Make the range usable up to page `end`: 0, or -1 where the kernel refuses. */
static int commit_to(size_t end)
{
    if (end <= usable)
        return 0;
    size_t to = (end + COMMIT_STEP - 1) / COMMIT_STEP * COMMIT_STEP;
    if (to > range_pages)
        to = range_pages;
    size_t entries_from = usable * sizeof(page_entry) / PAGE * PAGE;
    size_t entries_to = (to * sizeof(page_entry) + PAGE - 1) / PAGE * PAGE;
    if (mprotect(base + usable * PAGE, (to - usable) * PAGE, PROT_READ | PROT_WRITE) != 0 ||
        mprotect((char *)pages + entries_from, entries_to - entries_from, PROT_READ | PROT_WRITE) != 0)
        return -1;
    usable = to;
    return 0;
}

/* The first page of a block of n pages, or NIL when the range cannot hold it. Best fit: the smallest
 * free block that holds n pages (the lowest one among equals), its rest left free; else the free
 * block ending at the top, grown; else new pages at the top. */
static uint32_t take(size_t n)
{
    for (size_t c = size_class(n); c < CLASSES; c++) {
        uint32_t best = NIL;
        size_t best_n = 0;
        for (uint32_t i = free_lists[c]; i != NIL; i = pages[i].next) {
            size_t m = length(i);
            if (m >= n && (best == NIL || m < best_n || (m == best_n && i < best))) {
                best = i;
                best_n = m;
            }
        }
        if (best != NIL) {
            unlink_free(best);
            if (best_n > n)
                push_free(best + (uint32_t)n, best_n - n);
            mark(best, n, 0);
            used_pages += n;
            return best;
        }
    }
    size_t first = top;
    if (top > 0 && is_free((uint32_t)top - 1)) {
        size_t last = length((uint32_t)top - 1);
        first = top - last;
    }
    if (first + n > range_pages || commit_to(first + n) != 0)
        return NIL;
    if (first != top)
        unlink_free((uint32_t)first);
    top = first + n;
    mark((uint32_t)first, n, 0);
    used_pages += n;
    return (uint32_t)first;
}

static void give_back(uint32_t first)
{
    size_t n = length(first);
    used_pages -= n;
    uint32_t next = first + (uint32_t)n;
    if (next < top && is_free(next)) {
        n += length(next);
        unlink_free(next);
    }
    if (first > 0 && is_free(first - 1)) {
        uint32_t before = first - (uint32_t)length(first - 1);
        n += length(before);
        unlink_free(before);
        first = before;
    }
    push_free(first, n);
}

static int ours(const void *ptr)
{
    return base != NULL && (const char *)ptr >= base && (const char *)ptr < base + range_pages * PAGE;
}

static void corrupt(const char *message)
{
    static const char prefix[] = "ppmoco large-block cache: ";
    (void)!write(2, prefix, sizeof prefix - 1);
    (void)!write(2, message, strlen(message));
    (void)!write(2, "\n", 1);
    abort();
}

/* The first page of the block at ptr; aborts, as glibc does, on a pointer that is no block's. */
static uint32_t block_of(const void *ptr)
{
    size_t offset = (size_t)((const char *)ptr - base);
    uint32_t first = (uint32_t)(offset >> PAGE_SHIFT);
    if ((offset & (PAGE - 1)) != 0 || first >= top)
        corrupt("free(): invalid pointer");
    if (is_free(first))
        corrupt("free(): double free");
    return first;
}

static void *large_malloc(size_t size)
{
    if (size > ((size_t)NIL / 2) * PAGE)
        return NULL;
    size_t n = (size + PAGE - 1) >> PAGE_SHIFT;
    pthread_mutex_lock(&lock);
    if (ready == 0)
        reserve();
    uint32_t first = ready == 1 ? take(n) : NIL;
    pthread_mutex_unlock(&lock);
    return first == NIL ? NULL : base + (size_t)first * PAGE;
}

void *malloc(size_t size)
{
    void *ptr = size >= LARGE ? large_malloc(size) : NULL;
    return ptr != NULL ? ptr : __libc_malloc(size);
}

void free(void *ptr)
{
    if (!ours(ptr)) {
        __libc_free(ptr);
        return;
    }
    pthread_mutex_lock(&lock);
    give_back(block_of(ptr));
    pthread_mutex_unlock(&lock);
}

void *calloc(size_t count, size_t size)
{
    size_t total;
    if (__builtin_mul_overflow(count, size, &total)) {
        errno = ENOMEM;
        return NULL;
    }
    void *ptr = total >= LARGE ? large_malloc(total) : NULL;
    if (ptr == NULL)
        return __libc_calloc(count, size);
    return memset(ptr, 0, total); /* the block's pages may hold an earlier block's data */
}

static size_t capacity(void *ptr)
{
    pthread_mutex_lock(&lock);
    size_t n = length(block_of(ptr));
    pthread_mutex_unlock(&lock);
    return n * PAGE;
}

void *realloc(void *ptr, size_t size)
{
    if (!ours(ptr))
        return __libc_realloc(ptr, size);
    if (size == 0) {
        free(ptr);
        return NULL;
    }
    size_t have = capacity(ptr);
    if (size <= have && size >= LARGE)
        return ptr;
    void *moved = malloc(size);
    if (moved == NULL)
        return NULL;
    memcpy(moved, ptr, size < have ? size : have);
    free(ptr);
    return moved;
}

static void *aligned(size_t alignment, size_t size)
{
    void *ptr = size >= LARGE && alignment <= PAGE ? large_malloc(size) : NULL;
    return ptr != NULL ? ptr : __libc_memalign(alignment, size);
}

int posix_memalign(void **out, size_t alignment, size_t size)
{
    if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0)
        return EINVAL;
    void *ptr = aligned(alignment, size);
    if (ptr == NULL)
        return ENOMEM;
    *out = ptr;
    return 0;
}

void *memalign(size_t alignment, size_t size) { return aligned(alignment, size); }

void *aligned_alloc(size_t alignment, size_t size) { return aligned(alignment, size); }

void *valloc(size_t size) { return aligned(PAGE, size); }

void *pvalloc(size_t size) { return aligned(PAGE, (size + PAGE - 1) & ~(PAGE - 1)); }

size_t malloc_usable_size(void *ptr)
{
    static size_t (*glibc_usable_size)(void *);
    if (ours(ptr))
        return capacity(ptr);
    if (glibc_usable_size == NULL)
        glibc_usable_size = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
    return ptr == NULL || glibc_usable_size == NULL ? 0 : glibc_usable_size(ptr);
}

/* The range's state, for tests and diagnostics: its address, pages handed out (the top), in use,
 * free, reserved. */
void ppmoco_large_blocks_stats(size_t out[5])
{
    pthread_mutex_lock(&lock);
    out[0] = (size_t)base;
    out[1] = top;
    out[2] = used_pages;
    out[3] = free_pages;
    out[4] = range_pages;
    pthread_mutex_unlock(&lock);
}

static void before_fork(void) { pthread_mutex_lock(&lock); }
static void after_fork(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void install(void)
{
    pthread_atfork(before_fork, after_fork, after_fork);
}
