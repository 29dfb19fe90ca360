/*
 * The transaction pooler's engine in C (ADR 0017): one epoll thread that holds every pooled client
 * and server connection and moves their bytes, making the pooling decisions on the way.
 *
 * Behaviour: this file is a port of argon/wire/pooling.py (and of argon/wire/sql_scan.py), which
 * is the reference: the same names, the same rules, the same tests (tests/unit/test_pooling.py runs
 * its scenarios against both). Read that module's docstring first. In short: client messages are
 * framed and passed to the server the client holds; a client that needs a server and finds none
 * idle waits; a server goes back to its pool at ReadyForQuery 'I' with nothing unanswered; per
 * server a queue of requests says, for each response, forward it, drop it (a request the pooler
 * added) or answer it here (a request the pooler did not send); named prepared statements are
 * mapped to server statements `argon_<n>`; the tracked parameters follow their client; a
 * transaction that may leave session state resets its server with DISCARD ALL.
 *
 * I/O: the thread reads into one shared buffer and processes bytes in place; what a message needs
 * later (a partial message, a waiting client's request) is kept in the connection's own buffer, so
 * an idle client costs its struct and nothing else. Writes are collected per connection while a
 * read is processed and sent once at the end (one send for a whole response). A connection whose
 * output could not all be sent stops its peer from being read (backpressure); every connection a
 * read touched is flushed before any is re-armed, so that rule does not take a client out of the
 * epoll set for the moment its query waits to be sent.
 *
 * TLS: a client whose TLS Python negotiated (uvloop: an ssl.SSLObject over memory BIOs) is driven
 * here through the same `SSL *`, with the OpenSSL `_ssl` is linked to, as _relay.c does (see
 * ADR 0012): ciphertext from the socket into the read BIO, SSL_read for plaintext; plaintext through
 * SSL_write, the write BIO's records to the socket. Python keeps the SSLObject alive and untouched
 * until the client's end is reported.
 *
 * Python talks to the thread through commands (a mutex-protected list and an eventfd) and learns
 * what happened through events (another list and eventfd): a pool wants a server, a client or
 * server ended, a cancel's target, a pool quiesced. Counters for the API are read under the lock.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_CHUNK (256 * 1024)
#define MAX_EVENTS 256
#define WAKE_TAG ((uint64_t)1)
#define NPARAMS 5
#define TICK_SECONDS 1.0
#define TLS_OUT_CAP (64 * 1024)

#define MAX_MESSAGE ((1u << 30) - 1)
#define INSPECT_LIMIT (1u << 20)
#define SCAN_LIMIT (256u << 10)
#define SERVER_BUFFER_LIMIT (16u << 20)
#define MAX_CLIENT_STATEMENTS 10000
#define REGISTRY_BUDGET ((size_t)256 << 20)
#define POOL_STATEMENT_BUDGET ((size_t)32 << 20) /* per pool: one tenant cannot spend the others' share */
#define MAX_TOKENS_PER_STATEMENT 4096

enum { FORWARD, SKIP, FAKE };
enum { KIND_NONE, SETVARS, RESET };
enum { SV_ACTIVE, SV_IDLE, SV_RESETTING, SV_HELD, SV_CLOSED };
enum { CONN_CLIENT, CONN_SERVER };
enum { EV_WANT = 1, EV_CLIENT_END, EV_SERVER_END, EV_CANCEL, EV_PAUSED };

static const char *const TRACKED[NPARAMS] = {"client_encoding", "DateStyle", "TimeZone",
                                             "standard_conforming_strings", "application_name"};

/* ---- small things -------------------------------------------------------------------------- */

static double now_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint32_t rd32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static void wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint64_t hash_bytes(const void *data, size_t n) {
    const uint8_t *p = data;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static void signal_fd(int fd) {
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(fd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
}

static void drain_fd(int fd) {
    uint64_t v;
    while (read(fd, &v, sizeof v) > 0) {
    }
}

/* A growable byte buffer; `off` bytes at the front are already consumed. Empty buffers own no memory. */
typedef struct {
    uint8_t *data;
    size_t len, cap, off;
} Buf;

static size_t buf_avail(const Buf *b) {
    return b->len - b->off;
}

static int buf_append(Buf *b, const void *p, size_t n) {
    if (n == 0)
        return 0;
    if (b->off > 0 && b->off == b->len) {
        b->off = b->len = 0;
    }
    if (b->len + n > b->cap) {
        if (b->off > 0) { /* compact first */
            memmove(b->data, b->data + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        if (b->len + n > b->cap) {
            size_t cap = b->cap ? b->cap : 256;
            while (cap < b->len + n)
                cap *= 2;
            uint8_t *grown = realloc(b->data, cap);
            if (grown == NULL)
                return -1;
            b->data = grown;
            b->cap = cap;
        }
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

static void buf_consume(Buf *b, size_t n) {
    b->off += n;
    if (b->off >= b->len) {
        free(b->data);
        b->data = NULL;
        b->len = b->cap = b->off = 0;
    }
}

static void buf_free(Buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = b->off = 0;
}

/* ---- interned strings (tracked parameter values): equal values are one pointer ------------- */

typedef struct Str {
    struct Str *next;
    uint64_t hash;
    uint32_t refs, len;
    char s[];
} Str;

typedef struct {
    Str **buckets;
    size_t nbuckets, count;
} StrTable;

static Str *str_get(StrTable *t, const char *p, size_t n) {
    uint64_t h = hash_bytes(p, n);
    if (t->nbuckets == 0 || t->count > t->nbuckets) {
        size_t nb = t->nbuckets ? t->nbuckets * 2 : 64;
        Str **grown = calloc(nb, sizeof *grown);
        if (grown == NULL)
            return NULL;
        for (size_t i = 0; i < t->nbuckets; i++) {
            Str *s = t->buckets[i];
            while (s != NULL) {
                Str *next = s->next;
                s->next = grown[s->hash & (nb - 1)];
                grown[s->hash & (nb - 1)] = s;
                s = next;
            }
        }
        free(t->buckets);
        t->buckets = grown;
        t->nbuckets = nb;
    }
    Str **slot = &t->buckets[h & (t->nbuckets - 1)];
    for (Str *s = *slot; s != NULL; s = s->next) {
        if (s->hash == h && s->len == n && memcmp(s->s, p, n) == 0) {
            s->refs++;
            return s;
        }
    }
    Str *s = malloc(sizeof *s + n + 1);
    if (s == NULL)
        return NULL;
    s->hash = h;
    s->refs = 1;
    s->len = (uint32_t)n;
    memcpy(s->s, p, n);
    s->s[n] = 0;
    s->next = *slot;
    *slot = s;
    t->count++;
    return s;
}

static Str *str_ref(Str *s) {
    if (s != NULL)
        s->refs++;
    return s;
}

static void str_put(StrTable *t, Str *s) {
    if (s == NULL || --s->refs > 0)
        return;
    Str **slot = &t->buckets[s->hash & (t->nbuckets - 1)];
    while (*slot != s)
        slot = &(*slot)->next;
    *slot = s->next;
    t->count--;
    free(s);
}

/* ---- the statement registry ---------------------------------------------------------------- */

typedef struct Stmt {
    struct Stmt *next; /* hash chain */
    uint64_t hash, id, pool; /* a statement belongs to one pool, whose budget it is charged to */
    uint32_t refs, key_len;
    uint8_t stateful, name_len;
    char name[24]; /* argon_<id> */
    uint8_t key[]; /* a Parse body after the name: query \0, int16 count, oids */
} Stmt;

typedef struct {
    Stmt **buckets;
    size_t nbuckets, count, bytes;
    uint64_t next_id;
    void *owner; /* the engine: `uncharge` gives a freed statement's bytes back to its pool, if it still exists */
    void (*uncharge)(void *owner, uint64_t pool, size_t n);
} Registry;

static int changes_session(const uint8_t *sql, size_t n);

/* The statement of `pool` for `key`; NULL when the registry's or the pool's budget is spent (`*charged`
   is the pool's count, `budget` its limit). Pools share no statement: their servers are disjoint. */
static Stmt *reg_acquire(Registry *r, uint64_t pool, size_t *charged, size_t budget, const uint8_t *key, size_t n) {
    uint64_t h = hash_bytes(key, n) ^ (pool * 0x9E3779B97F4A7C15ULL);
    if (r->nbuckets == 0 || r->count > r->nbuckets) {
        size_t nb = r->nbuckets ? r->nbuckets * 2 : 256;
        Stmt **grown = calloc(nb, sizeof *grown);
        if (grown == NULL)
            return NULL;
        for (size_t i = 0; i < r->nbuckets; i++) {
            Stmt *s = r->buckets[i];
            while (s != NULL) {
                Stmt *next = s->next;
                s->next = grown[s->hash & (nb - 1)];
                grown[s->hash & (nb - 1)] = s;
                s = next;
            }
        }
        free(r->buckets);
        r->buckets = grown;
        r->nbuckets = nb;
    }
    Stmt **slot = &r->buckets[h & (r->nbuckets - 1)];
    for (Stmt *s = *slot; s != NULL; s = s->next) {
        if (s->hash == h && s->pool == pool && s->key_len == n && memcmp(s->key, key, n) == 0) {
            s->refs++;
            return s;
        }
    }
    if (r->bytes + n > REGISTRY_BUDGET || *charged + n > budget)
        return NULL;
    Stmt *s = malloc(sizeof *s + n);
    if (s == NULL)
        return NULL;
    s->hash = h;
    s->pool = pool;
    s->id = ++r->next_id;
    s->refs = 1;
    s->key_len = (uint32_t)n;
    memcpy(s->key, key, n);
    s->name_len = (uint8_t)snprintf(s->name, sizeof s->name, "argon_%llu", (unsigned long long)s->id);
    if (n > SCAN_LIMIT) {
        s->stateful = 1;
    } else {
        const uint8_t *end = memchr(key, 0, n);
        s->stateful = (uint8_t)changes_session(key, end != NULL ? (size_t)(end - key) : n);
    }
    s->next = *slot;
    *slot = s;
    r->count++;
    r->bytes += n;
    *charged += n;
    return s;
}

static void reg_release(Registry *r, Stmt *s) {
    if (--s->refs > 0)
        return;
    Stmt **slot = &r->buckets[s->hash & (r->nbuckets - 1)];
    while (*slot != s)
        slot = &(*slot)->next;
    *slot = s->next;
    r->count--;
    r->bytes -= s->key_len;
    if (r->uncharge != NULL)
        r->uncharge(r->owner, s->pool, s->key_len);
    free(s);
}

/* ---- a client's statement names ------------------------------------------------------------ */

typedef struct CName {
    struct CName *next;
    Stmt *stmt;
    uint64_t hash;
    uint32_t len;
    uint8_t name[];
} CName;

typedef struct {
    CName **buckets;
    size_t nbuckets, count;
} CMap;

static CName **cmap_slot(CMap *m, const uint8_t *name, size_t n, uint64_t h) {
    CName **slot = &m->buckets[h & (m->nbuckets - 1)];
    while (*slot != NULL && !((*slot)->hash == h && (*slot)->len == n && memcmp((*slot)->name, name, n) == 0))
        slot = &(*slot)->next;
    return slot;
}

static Stmt *cmap_get(CMap *m, const uint8_t *name, size_t n) {
    if (m == NULL || m->count == 0)
        return NULL;
    CName *e = *cmap_slot(m, name, n, hash_bytes(name, n));
    return e != NULL ? e->stmt : NULL;
}

static int cmap_grow(CMap *m) {
    size_t nb = m->nbuckets ? m->nbuckets * 2 : 16;
    CName **grown = calloc(nb, sizeof *grown);
    if (grown == NULL)
        return -1;
    for (size_t i = 0; i < m->nbuckets; i++) {
        CName *e = m->buckets[i];
        while (e != NULL) {
            CName *next = e->next;
            e->next = grown[e->hash & (nb - 1)];
            grown[e->hash & (nb - 1)] = e;
            e = next;
        }
    }
    free(m->buckets);
    m->buckets = grown;
    m->nbuckets = nb;
    return 0;
}

static int cmap_put(CMap *m, const uint8_t *name, size_t n, Stmt *stmt) {
    if ((m->nbuckets == 0 || m->count >= m->nbuckets) && cmap_grow(m) < 0)
        return -1;
    CName *e = malloc(sizeof *e + n);
    if (e == NULL)
        return -1;
    e->hash = hash_bytes(name, n);
    e->len = (uint32_t)n;
    e->stmt = stmt;
    memcpy(e->name, name, n);
    CName **slot = &m->buckets[e->hash & (m->nbuckets - 1)];
    e->next = *slot;
    *slot = e;
    m->count++;
    return 0;
}

/* Remove a name; its statement (NULL if it was not there) is the caller's to release. */
static Stmt *cmap_del(CMap *m, const uint8_t *name, size_t n) {
    if (m == NULL || m->count == 0)
        return NULL;
    CName **slot = cmap_slot(m, name, n, hash_bytes(name, n));
    CName *e = *slot;
    if (e == NULL)
        return NULL;
    *slot = e->next;
    Stmt *stmt = e->stmt;
    free(e);
    m->count--;
    return stmt;
}

static void cmap_clear(CMap *m, Registry *r) {
    if (m == NULL)
        return;
    for (size_t i = 0; i < m->nbuckets; i++) {
        CName *e = m->buckets[i];
        while (e != NULL) {
            CName *next = e->next;
            reg_release(r, e->stmt);
            free(e);
            e = next;
        }
        m->buckets[i] = NULL;
    }
    m->count = 0;
}

/* ---- a server's statements: a hash by id, and a list in LRU order (oldest first) ------------ */

typedef struct SPrep {
    struct SPrep *hnext, *prev, *next;
    Stmt *stmt;
} SPrep;

typedef struct {
    SPrep **buckets;
    size_t nbuckets, count;
    SPrep *oldest, *newest;
} SPTable;

static SPrep *sp_find(SPTable *t, Stmt *stmt) {
    if (t->count == 0)
        return NULL;
    for (SPrep *e = t->buckets[stmt->id & (t->nbuckets - 1)]; e != NULL; e = e->hnext)
        if (e->stmt == stmt)
            return e;
    return NULL;
}

static void sp_unlink(SPTable *t, SPrep *e) {
    if (e->prev != NULL)
        e->prev->next = e->next;
    else
        t->oldest = e->next;
    if (e->next != NULL)
        e->next->prev = e->prev;
    else
        t->newest = e->prev;
    e->prev = e->next = NULL;
}

static void sp_link_newest(SPTable *t, SPrep *e) {
    e->prev = t->newest;
    e->next = NULL;
    if (t->newest != NULL)
        t->newest->next = e;
    else
        t->oldest = e;
    t->newest = e;
}

static void sp_link_oldest(SPTable *t, SPrep *e) {
    e->next = t->oldest;
    e->prev = NULL;
    if (t->oldest != NULL)
        t->oldest->prev = e;
    else
        t->newest = e;
    t->oldest = e;
}

static void sp_touch(SPTable *t, SPrep *e) {
    if (t->newest != e) {
        sp_unlink(t, e);
        sp_link_newest(t, e);
    }
}

static int sp_add(SPTable *t, Stmt *stmt, int oldest) {
    if (t->nbuckets == 0 || t->count >= t->nbuckets) {
        size_t nb = t->nbuckets ? t->nbuckets * 2 : 16;
        SPrep **grown = calloc(nb, sizeof *grown);
        if (grown == NULL)
            return -1;
        for (SPrep *e = t->oldest; e != NULL; e = e->next) {
            e->hnext = grown[e->stmt->id & (nb - 1)];
            grown[e->stmt->id & (nb - 1)] = e;
        }
        free(t->buckets);
        t->buckets = grown;
        t->nbuckets = nb;
    }
    SPrep *e = calloc(1, sizeof *e);
    if (e == NULL)
        return -1;
    e->stmt = stmt;
    SPrep **slot = &t->buckets[stmt->id & (t->nbuckets - 1)];
    e->hnext = *slot;
    *slot = e;
    if (oldest)
        sp_link_oldest(t, e);
    else
        sp_link_newest(t, e);
    t->count++;
    return 0;
}

/* Remove an entry; returns its statement (the caller keeps or drops the reference). */
static Stmt *sp_remove(SPTable *t, SPrep *e) {
    SPrep **slot = &t->buckets[e->stmt->id & (t->nbuckets - 1)];
    while (*slot != e)
        slot = &(*slot)->hnext;
    *slot = e->hnext;
    sp_unlink(t, e);
    Stmt *stmt = e->stmt;
    free(e);
    t->count--;
    return stmt;
}

static void sp_clear(SPTable *t, Registry *r) {
    while (t->oldest != NULL)
        reg_release(r, sp_remove(t, t->oldest));
}

static void sp_free(SPTable *t, Registry *r) {
    sp_clear(t, r);
    free(t->buckets);
    t->buckets = NULL;
    t->nbuckets = 0;
}

/* ---- a server's request queue (a ring; eight inline, more on the heap) -------------------- */

typedef struct {
    uint8_t tag, action, kind, names; /* names: SETVARS' parameters, one bit each */
    Stmt *stmt;                       /* a Parse: registered by it; a Close (SKIP): evicted by it */
    char *error;                      /* the pooler's own query failed with this text */
} Request;

#define QUEUE_INLINE 8

typedef struct {
    Request *items;
    uint32_t head, count, cap;
    Request inline_items[QUEUE_INLINE];
} Queue;

static void q_init(Queue *q) {
    q->items = q->inline_items;
    q->head = q->count = 0;
    q->cap = QUEUE_INLINE;
}

static Request *q_head(Queue *q) {
    return q->count ? &q->items[q->head] : NULL;
}

static Request *q_push(Queue *q, uint8_t tag, uint8_t action) {
    if (q->count == q->cap) {
        uint32_t cap = q->cap * 2;
        Request *grown = malloc(cap * sizeof *grown);
        if (grown == NULL)
            return NULL;
        for (uint32_t i = 0; i < q->count; i++)
            grown[i] = q->items[(q->head + i) % q->cap];
        if (q->items != q->inline_items)
            free(q->items);
        q->items = grown;
        q->head = 0;
        q->cap = cap;
    }
    Request *r = &q->items[(q->head + q->count) % q->cap];
    memset(r, 0, sizeof *r);
    r->tag = tag;
    r->action = action;
    q->count++;
    return r;
}

static Request q_pop(Queue *q) {
    Request r = q->items[q->head];
    q->head = (q->head + 1) % q->cap;
    q->count--;
    if (q->count == 0 && q->items != q->inline_items) {
        free(q->items);
        q_init(q);
    } else if (q->count == 0) {
        q->head = 0;
    }
    return r;
}

static void q_free(Queue *q) {
    while (q->count)
        free(q_pop(q).error);
    if (q->items != q->inline_items)
        free(q->items);
    q_init(q);
}

/* ---- sql_scan: whether SQL may leave session state (a port of argon/wire/sql_scan.py) ------- */

enum { T_IDENT, T_QIDENT, T_STRING, T_PUNCT };

typedef struct {
    uint8_t kind;
    uint32_t len;
    const uint8_t *p;
} Tok;

static int is_space(uint8_t c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

static int ident_start(uint8_t c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}

static int ident_char(uint8_t c) {
    return ident_start(c) || (c >= '0' && c <= '9') || c == '$';
}

/* The token is this word (unquoted: any case; quoted: exactly). */
static int tok_is(const Tok *t, const char *word) {
    size_t n = strlen(word);
    if (t->len != n)
        return 0;
    if (t->kind == T_IDENT)
        return strncasecmp((const char *)t->p, word, n) == 0;
    if (t->kind == T_QIDENT)
        return memcmp(t->p, word, n) == 0;
    return 0;
}

static int word_at(const Tok *t, int n, int k, const char *word) {
    return k < n && (t[k].kind == T_IDENT || t[k].kind == T_QIDENT) && tok_is(&t[k], word);
}

static int is_tracked_name(const uint8_t *p, size_t n) {
    static const char *const names[] = {"client_encoding", "datestyle", "timezone", "standard_conforming_strings",
                                        "application_name"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strlen(names[i]) == n && strncasecmp((const char *)p, names[i], n) == 0)
            return 1;
    return 0;
}

/* words[] are the identifier tokens of a statement */
static int follows(Tok **words, int nw, const char *a, const char *b) {
    for (int i = 0; i + 1 < nw; i++)
        if (tok_is(words[i], a) && tok_is(words[i + 1], b))
            return 1;
    return 0;
}

static int is_tracked_exact(const uint8_t *p, size_t n) {
    static const char *const names[] = {"client_encoding", "datestyle", "timezone", "standard_conforming_strings",
                                        "application_name"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strlen(names[i]) == n && memcmp(p, names[i], n) == 0)
            return 1;
    return 0;
}

/* A word token naming a tracked parameter (unquoted: any case; quoted: as Python compares it). */
static int tracked_word(const Tok *t) {
    return (t->kind == T_IDENT && is_tracked_name(t->p, t->len)) ||
           (t->kind == T_QIDENT && is_tracked_exact(t->p, t->len));
}

static int statement_changes(Tok *t, int n, Tok **words) {
    int k = 0;
    while (k < n && t[k].kind == T_PUNCT && t[k].p[0] == '(')
        k++;
    if (word_at(t, n, k, "set")) {
        if (word_at(t, n, k + 1, "local") || word_at(t, n, k + 1, "transaction") || word_at(t, n, k + 1, "constraints"))
            return 0;
        int at = k + (word_at(t, n, k + 1, "session") ? 2 : 1);
        if (word_at(t, n, at, "time") && word_at(t, n, at + 1, "zone"))
            return 0;
        return !(at < n && tracked_word(&t[at]));
    }
    if (word_at(t, n, k, "listen") || word_at(t, n, k, "prepare") || word_at(t, n, k, "load"))
        return 1;
    if (word_at(t, n, k, "deallocate")) {
        int rest = n - k - 1;
        if (rest == 1 && tok_is(&t[k + 1], "all"))
            return 0;
        if (rest == 2 && tok_is(&t[k + 1], "prepare") && tok_is(&t[k + 2], "all"))
            return 0;
        return 1;
    }
    int nw = 0;
    for (int i = 0; i < n; i++)
        if (t[i].kind == T_IDENT || t[i].kind == T_QIDENT)
            words[nw++] = &t[i];
    if (word_at(t, n, k, "declare") && follows(words, nw, "with", "hold"))
        return 1;
    if (word_at(t, n, k, "create")) {
        int temp = 0;
        for (int i = 1; i < nw && i < 8; i++) {
            if (tok_is(words[i], "table") || tok_is(words[i], "view") || tok_is(words[i], "sequence") ||
                tok_is(words[i], "recursive"))
                break;
            if (tok_is(words[i], "temp") || tok_is(words[i], "temporary"))
                temp = 1;
        }
        if (temp && !follows(words, nw, "commit", "drop"))
            return 1;
    }
    if (follows(words, nw, "into", "temp") || follows(words, nw, "into", "temporary"))
        return 1;
    for (int i = 0; i + 1 < n; i++) {
        if ((t[i].kind != T_IDENT && t[i].kind != T_QIDENT) || t[i + 1].kind != T_PUNCT || t[i + 1].p[0] != '(')
            continue;
        if (tok_is(&t[i], "pg_advisory_lock") || tok_is(&t[i], "pg_advisory_lock_shared") ||
            tok_is(&t[i], "pg_try_advisory_lock") || tok_is(&t[i], "pg_try_advisory_lock_shared") ||
            tok_is(&t[i], "dblink_connect") || tok_is(&t[i], "dblink_connect_u"))
            return 1;
        if (tok_is(&t[i], "set_config") &&
            (i + 2 >= n || t[i + 2].kind != T_STRING || !is_tracked_name(t[i + 2].p, t[i + 2].len)))
            return 1;
    }
    return 0;
}

static int word_here(const uint8_t *p, size_t left, const char *word) {
    size_t n = strlen(word);
    if (left < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        uint8_t c = p[i] >= 'A' && p[i] <= 'Z' ? (uint8_t)(p[i] | 0x20) : p[i]; /* not '_' | 0x20 */
        if (c != (uint8_t)word[i])
            return 0;
    }
    return 1;
}

static int is_word_char(uint8_t c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* Whether a rule could apply (sql_scan._needs_lexing): one of the words a rule needs appears (any
   case), or `set` where a statement starts (`UPDATE ... SET` needs nothing), or `set` anywhere in
   text with comments (a comment can hide where a statement starts). */
static int has_trigger(const uint8_t *sql, size_t n) {
    int set_anywhere = 0, set_leading = 0, comments = 0, at_start = 1;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = sql + i;
        size_t left = n - i;
        uint8_t c = p[0];
        if ((c == '-' && left > 1 && p[1] == '-') || (c == '/' && left > 1 && p[1] == '*'))
            comments = 1;
        switch (c | 0x20) {
        case 's':
            if (word_here(p, left, "set")) {
                if (word_here(p, left, "set_config"))
                    return 1;
                set_anywhere = 1;
                if (at_start && (left == 3 || !is_word_char(p[3])))
                    set_leading = 1;
            }
            break;
        case 'l':
            if (word_here(p, left, "listen") || word_here(p, left, "load"))
                return 1;
            break;
        case 'p':
            if (word_here(p, left, "prepare"))
                return 1;
            break;
        case 'd':
            if (word_here(p, left, "deallocate") || word_here(p, left, "dblink"))
                return 1;
            break;
        case 'h':
            if (word_here(p, left, "hold"))
                return 1;
            break;
        case 't':
            if (word_here(p, left, "temp"))
                return 1;
            break;
        case 'a':
            if (word_here(p, left, "advisory"))
                return 1;
            break;
        default:
            break;
        }
        if (c == ';')
            at_start = 1;
        else if (!(at_start && (is_space(c) || c == '(')))
            at_start = 0;
    }
    return set_leading || (set_anywhere && comments);
}

/* Skip a quoted token's body starting after its opening quote; the index after it, or -1. */
static long skip_quoted(const uint8_t *s, size_t n, size_t i, uint8_t quote, int backslash) {
    while (i < n) {
        if (backslash && s[i] == '\\') {
            i += 2;
        } else if (s[i] == quote) {
            if (i + 1 < n && s[i + 1] == quote)
                i += 2;
            else
                return (long)(i + 1);
        } else {
            i++;
        }
    }
    return -1;
}

/* `toks` and `words` hold MAX_TOKENS_PER_STATEMENT + 2 entries (the engine keeps one pair). */
static int changes_session_in(const uint8_t *sql, size_t n, Tok *toks, Tok **words) {
    if (!has_trigger(sql, n))
        return 0;
    int result = 1;
    int nt = 0;
    size_t i = 0;
    while (i < n) {
        uint8_t c = sql[i];
        if (nt > MAX_TOKENS_PER_STATEMENT)
            goto out; /* too long to judge: treated as state-changing */
        if (is_space(c)) {
            i++;
        } else if (c == '-' && i + 1 < n && sql[i + 1] == '-') {
            const uint8_t *nl = memchr(sql + i, '\n', n - i);
            i = nl != NULL ? (size_t)(nl - sql) + 1 : n;
        } else if (c == '/' && i + 1 < n && sql[i + 1] == '*') {
            int depth = 1;
            i += 2;
            while (depth) {
                if (i >= n)
                    goto out;
                if (i + 1 < n && sql[i] == '/' && sql[i + 1] == '*') {
                    depth++;
                    i += 2;
                } else if (i + 1 < n && sql[i] == '*' && sql[i + 1] == '/') {
                    depth--;
                    i += 2;
                } else {
                    i++;
                }
            }
        } else if (c == '\'' || ((c == 'E' || c == 'e') && i + 1 < n && sql[i + 1] == '\'') ||
                   ((c == 'U' || c == 'u') && i + 2 < n && sql[i + 1] == '&' && sql[i + 2] == '\'')) {
            size_t start = c == '\'' ? i + 1 : (c == 'E' || c == 'e') ? i + 2 : i + 3;
            long end = skip_quoted(sql, n, start, '\'', c == 'E' || c == 'e');
            if (end < 0)
                goto out;
            toks[nt++] = (Tok){T_STRING, (uint32_t)((size_t)end - 1 - start), sql + start};
            i = (size_t)end;
        } else if (c == '"') {
            long end = skip_quoted(sql, n, i + 1, '"', 0);
            if (end < 0)
                goto out;
            toks[nt++] = (Tok){T_QIDENT, (uint32_t)((size_t)end - 2 - i), sql + i + 1};
            i = (size_t)end;
        } else if (c == '$' && i + 1 < n && !(sql[i + 1] >= '0' && sql[i + 1] <= '9')) {
            const uint8_t *close = memchr(sql + i + 1, '$', n - i - 1);
            size_t taglen = close != NULL ? (size_t)(close - (sql + i)) + 1 : 0;
            int ok = taglen > 0;
            for (size_t j = i + 1; ok && j + 1 < i + taglen; j++)
                if (!ident_char(sql[j]) || sql[j] == '$')
                    ok = 0;
            if (!ok) {
                i++;
                continue;
            }
            size_t j = i + taglen;
            int found = 0;
            while (j + taglen <= n) {
                if (memcmp(sql + j, sql + i, taglen) == 0) {
                    found = 1;
                    break;
                }
                j++;
            }
            if (!found)
                goto out;
            toks[nt++] = (Tok){T_STRING, 0, sql + i};
            i = j + taglen;
        } else if (ident_start(c)) {
            size_t j = i + 1;
            while (j < n && ident_char(sql[j]))
                j++;
            toks[nt++] = (Tok){T_IDENT, (uint32_t)(j - i), sql + i};
            i = j;
        } else if (c == ';') {
            if (nt > 0 && statement_changes(toks, nt, words))
                goto out;
            nt = 0;
            i++;
        } else {
            toks[nt++] = (Tok){T_PUNCT, 1, sql + i};
            i++;
        }
    }
    result = nt > 0 && statement_changes(toks, nt, words);
out:
    return result;
}

static int changes_session(const uint8_t *sql, size_t n) {
    if (!has_trigger(sql, n))
        return 0;
    Tok *toks = malloc((MAX_TOKENS_PER_STATEMENT + 2) * sizeof *toks);
    Tok **words = malloc((MAX_TOKENS_PER_STATEMENT + 2) * sizeof *words);
    int result = toks == NULL || words == NULL ? 1 : changes_session_in(sql, n, toks, words);
    free(toks);
    free(words);
    return result;
}

/* ---- OpenSSL, as linked into Python's _ssl module (see _relay.c) --------------------------- */

typedef struct {
    int (*SSL_read)(void *ssl, void *buf, int num);
    int (*SSL_write)(void *ssl, const void *buf, int num);
    int (*SSL_get_error)(const void *ssl, int ret);
    void *(*SSL_get_rbio)(const void *ssl);
    void *(*SSL_get_wbio)(const void *ssl);
    void *(*SSL_get_ex_data)(const void *ssl, int idx);
    int (*SSL_shutdown)(void *ssl);
    int (*BIO_write)(void *bio, const void *data, int len);
    int (*BIO_read)(void *bio, void *data, int len);
    long (*BIO_ctrl)(void *bio, int cmd, long larg, void *parg);
    void (*ERR_clear_error)(void);
    long (*SSL_ctrl)(void *ssl, int cmd, long larg, void *parg);
    int (*SSL_has_pending)(const void *ssl);
} OpenSSL;

static OpenSSL ossl;
static int ossl_loaded;

#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_ZERO_RETURN 6
#define BIO_CTRL_PENDING 10
#define SSL_CTRL_MODE 33
#define SSL_MODE_RELEASE_BUFFERS 0x10L

typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    void *ssl;
} PySSLSocketHead;

/* ---- the engine's objects ------------------------------------------------------------------ */

struct Engine;
struct Pool;
struct Server;

typedef struct Conn {
    int fd;
    uint8_t kind;       /* CONN_CLIENT or CONN_SERVER */
    uint8_t registered; /* in the epoll set */
    uint8_t touched;    /* on the engine's list of connections to flush and re-arm */
    uint8_t closed;     /* ended: unregistered, fd closed; freed after the event batch */
    uint8_t eof;        /* the peer closed its side */
    uint32_t mask;
    Buf out;            /* bytes for this socket not sent yet (ciphertext for a TLS client) */
    Buf in;             /* bytes read from this socket not processed yet */
    uint64_t id;
    struct Conn *tnext; /* the touched list */
    struct Conn *dnext; /* the dead list (a closed connection may still be on the touched list) */
} Conn;

typedef struct Client {
    Conn c;
    void *ssl;
    Buf plain; /* TLS: plaintext to encrypt at the next flush */
    struct Pool *pool;
    struct Server *server;
    uint32_t stream; /* body bytes of the current message still to pass through */
    uint8_t copy_in, waiting, terminating; /* terminating: sent Terminate while answers were still due */
    CMap *prepared;
    Str *params[NPARAMS];
    double waiting_since;
    struct Client *wnext, *wprev; /* the pool's waiting queue */
    struct Client *pnext, *pprev; /* the pool's clients */
    uint64_t bytes_in, bytes_out;
} Client;

typedef struct Server {
    Conn c;
    struct Pool *pool;
    Client *client;
    uint32_t stream;
    uint8_t stream_to_client, status, copy_mode, query_failed, dirty, state;
    uint32_t holds;
    Queue queue;
    SPTable prepared;
    Str *params[NPARAMS];
    double idle_since;
    struct Server *inext, *iprev; /* the pool's idle stack */
    struct Server *snext, *sprev; /* the pool's servers */
} Server;

typedef struct Pool {
    uint64_t id;
    int size, opening, paused, nservers, nclients, nwaiting, nidle, nactive, nused;
    Server *idle;    /* top of the idle stack (most recently used) */
    Server *servers; /* all of them */
    Client *wait_head, *wait_tail, *clients;
    double last_activity;
    uint64_t xact_count, query_count, wait_count;
    double wait_time;
    size_t stmt_bytes; /* the texts of this pool's statements in the registry */
    struct Pool *next; /* in the engine's pool table bucket */
} Pool;

typedef struct {
    int type;
    uint64_t a, b, c, d;
} Event;

enum { CMD_ADD_POOL = 1, CMD_RESIZE, CMD_DROP_POOL, CMD_ADD_CLIENT, CMD_ADD_SERVER, CMD_FAILED, CMD_CANCEL,
       CMD_UNHOLD, CMD_PAUSE, CMD_PAUSE_FORCE, CMD_RESUME, CMD_CLOSE_CLIENT, CMD_LIMITS };

typedef struct Command {
    struct Command *next;
    int type;
    uint64_t pool, id, token;
    int fd, size, requested;
    void *ssl;
    uint8_t *data; /* greeting / pending / error bytes */
    size_t data_len;
    uint8_t *pending;
    size_t pending_len;
    char *params[NPARAMS];
    size_t param_len[NPARAMS];
    double wait_timeout, idle_timeout;
    int max_prepared;
    Py_ssize_t statement_budget;
} Command;

typedef struct Engine {
    PyObject_HEAD
    int epfd, wake_fd, event_fd;
    pthread_t thread;
    int running, stop;
    uint8_t *buf, *tlsbuf;
    pthread_mutex_t lock;
    /* protected by lock */
    Command *commands, *commands_tail;
    Event *events;
    size_t nevents, events_cap;
    Pool **pools; /* by id, chained */
    size_t npool_buckets, npools;
    uint64_t clients_open, servers_open; /* for stats() */
    /* the thread's own */
    Registry registry;
    StrTable strings;
    Conn *touched;
    Conn **arm; /* settle's workspace: connections flushed, to re-arm */
    size_t narm, arm_cap;
    Conn *dead;
    double now, last_tick, wait_timeout, idle_timeout;
    int max_prepared;
    size_t pool_statement_budget;
    Tok *toks; /* the lexer's workspace (sql_scan) */
    Tok **words;
} Engine;

static void emit(Engine *e, int type, uint64_t a, uint64_t b, uint64_t c, uint64_t d);
static void run_client(Engine *e, Client *cl);
static void run_server(Engine *e, Server *sv);
static void client_lost(Engine *e, Client *cl);
static void fail_client(Engine *e, Client *cl, const uint8_t *error, size_t error_len);
static void close_server(Engine *e, Server *sv);
static void server_lost(Engine *e, Server *sv);
static void want(Engine *e, Pool *p);
static void assign(Engine *e, Pool *p);
static void idle(Engine *e, Server *sv);
static int send_server(Engine *e, Server *sv, const void *p, size_t n);
static int send_client(Engine *e, Client *cl, const void *p, size_t n);

static void touch(Engine *e, Conn *c) {
    if (!c->touched && !c->closed) {
        c->touched = 1;
        c->tnext = e->touched;
        e->touched = c;
    }
}

/* ---- messages the pooler writes ------------------------------------------------------------ */

static const uint8_t PARSE_COMPLETE[5] = {'1', 0, 0, 0, 4};
static const uint8_t CLOSE_COMPLETE[5] = {'3', 0, 0, 0, 4};
static const uint8_t READY_IDLE[6] = {'Z', 0, 0, 0, 5, 'I'};
static const uint8_t DISCARD_ALL[17] = {'Q', 0, 0, 0, 16, 'D', 'I', 'S', 'C', 'A', 'R', 'D', ' ', 'A', 'L', 'L', 0};

/* An ErrorResponse (S, V, C, M) into `out` (at most `cap` bytes); its length. */
static size_t error_response(uint8_t *out, size_t cap, const char *severity, const char *code, const char *message) {
    size_t ls = strlen(severity), lc = strlen(code), lm = strlen(message);
    size_t body = 2 * (ls + 2) + lc + 2 + lm + 2 + 1;
    if (1 + 4 + body > cap) {
        lm = cap - (1 + 4 + 2 * (ls + 2) + lc + 2 + 2 + 1);
        body = 2 * (ls + 2) + lc + 2 + lm + 2 + 1;
    }
    uint8_t *p = out;
    *p++ = 'E';
    wr32(p, (uint32_t)(4 + body));
    p += 4;
    *p++ = 'S';
    memcpy(p, severity, ls + 1);
    p += ls + 1;
    *p++ = 'V';
    memcpy(p, severity, ls + 1);
    p += ls + 1;
    *p++ = 'C';
    memcpy(p, code, lc + 1);
    p += lc + 1;
    *p++ = 'M';
    memcpy(p, message, lm);
    p += lm;
    *p++ = 0;
    *p++ = 0;
    return (size_t)(p - out);
}

static void fail_client_text(Engine *e, Client *cl, const char *code, const char *message) {
    uint8_t err[1024];
    size_t n = error_response(err, sizeof err, "FATAL", code, message);
    fail_client(e, cl, err, n);
}

static int frame_into(Buf *b, uint8_t tag, const void *a, size_t na, const void *c, size_t nc) {
    uint8_t hdr[5];
    hdr[0] = tag;
    wr32(hdr + 1, (uint32_t)(4 + na + nc));
    return buf_append(b, hdr, 5) < 0 || buf_append(b, a, na) < 0 || buf_append(b, c, nc) < 0 ? -1 : 0;
}

/* ---- ids -> connections (for commands that name a client or a server) ----------------------- */

typedef struct {
    Conn **slots; /* open addressing, linear probing; NULL empty, TOMB deleted */
    size_t cap, count, used;
} ConnMap;

static Conn TOMB_CONN;
#define TOMB (&TOMB_CONN)

static ConnMap conns; /* the thread's own (one engine per process in practice; guarded by being thread-only) */

static int cm_grow(ConnMap *m) {
    size_t cap = m->cap ? m->cap * 2 : 1024;
    Conn **slots = calloc(cap, sizeof *slots);
    if (slots == NULL)
        return -1;
    for (size_t i = 0; i < m->cap; i++) {
        Conn *c = m->slots[i];
        if (c == NULL || c == TOMB)
            continue;
        size_t j = (size_t)(c->id * 0x9E3779B97F4A7C15ULL) & (cap - 1);
        while (slots[j] != NULL)
            j = (j + 1) & (cap - 1);
        slots[j] = c;
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    m->used = m->count;
    return 0;
}

static int cm_put(ConnMap *m, Conn *c) {
    if ((m->used + 1) * 2 > m->cap && cm_grow(m) < 0)
        return -1;
    size_t j = (size_t)(c->id * 0x9E3779B97F4A7C15ULL) & (m->cap - 1);
    while (m->slots[j] != NULL && m->slots[j] != TOMB)
        j = (j + 1) & (m->cap - 1);
    if (m->slots[j] == NULL)
        m->used++;
    m->slots[j] = c;
    m->count++;
    return 0;
}

static Conn *cm_get(ConnMap *m, uint64_t id, int kind) {
    if (m->cap == 0)
        return NULL;
    size_t j = (size_t)(id * 0x9E3779B97F4A7C15ULL) & (m->cap - 1);
    while (m->slots[j] != NULL) {
        Conn *c = m->slots[j];
        if (c != TOMB && c->id == id && c->kind == kind)
            return c;
        j = (j + 1) & (m->cap - 1);
    }
    return NULL;
}

static void cm_del(ConnMap *m, Conn *c) {
    if (m->cap == 0)
        return;
    size_t j = (size_t)(c->id * 0x9E3779B97F4A7C15ULL) & (m->cap - 1);
    while (m->slots[j] != NULL) {
        if (m->slots[j] == c) {
            m->slots[j] = TOMB;
            m->count--;
            return;
        }
        j = (j + 1) & (m->cap - 1);
    }
}

/* ---- pools ----------------------------------------------------------------------------------- */

static Pool *pool_find(Engine *e, uint64_t id) {
    if (e->npool_buckets == 0)
        return NULL;
    for (Pool *p = e->pools[id & (e->npool_buckets - 1)]; p != NULL; p = p->next)
        if (p->id == id)
            return p;
    return NULL;
}

/* The registry's `uncharge` (on the engine's thread, the only writer of the pool table). */
static void pool_uncharge(void *owner, uint64_t id, size_t n) {
    Pool *p = pool_find((Engine *)owner, id);
    if (p != NULL)
        p->stmt_bytes = p->stmt_bytes > n ? p->stmt_bytes - n : 0;
}

static void set_state(Server *sv, uint8_t state) {
    Pool *p = sv->pool;
    if (sv->state == state)
        return;
    if (sv->state == SV_ACTIVE)
        p->nactive--;
    else if (sv->state == SV_IDLE)
        p->nidle--;
    else if (sv->state == SV_RESETTING || sv->state == SV_HELD)
        p->nused--;
    sv->state = state;
    if (state == SV_ACTIVE)
        p->nactive++;
    else if (state == SV_IDLE)
        p->nidle++;
    else if (state == SV_RESETTING || state == SV_HELD)
        p->nused++;
}

static void idle_push(Pool *p, Server *sv) {
    sv->iprev = NULL;
    sv->inext = p->idle;
    if (p->idle != NULL)
        p->idle->iprev = sv;
    p->idle = sv;
}

static void idle_remove(Pool *p, Server *sv) {
    if (sv->iprev != NULL)
        sv->iprev->inext = sv->inext;
    else if (p->idle == sv)
        p->idle = sv->inext;
    else
        return; /* not on the stack */
    if (sv->inext != NULL)
        sv->inext->iprev = sv->iprev;
    sv->inext = sv->iprev = NULL;
}

static void wait_remove(Pool *p, Client *cl) {
    if (cl->wprev != NULL)
        cl->wprev->wnext = cl->wnext;
    else
        p->wait_head = cl->wnext;
    if (cl->wnext != NULL)
        cl->wnext->wprev = cl->wprev;
    else
        p->wait_tail = cl->wprev;
    cl->wnext = cl->wprev = NULL;
    cl->waiting = 0;
    p->nwaiting--;
}

/* ---- sending (collected; flushed at the end of the event batch) ----------------------------- */

static int send_server(Engine *e, Server *sv, const void *p, size_t n) {
    if (sv->c.closed)
        return 0;
    if (buf_append(&sv->c.out, p, n) < 0)
        return -1;
    touch(e, &sv->c);
    return 0;
}

static int send_client(Engine *e, Client *cl, const void *p, size_t n) {
    if (cl->c.closed)
        return 0;
    if (buf_append(cl->ssl != NULL ? &cl->plain : &cl->c.out, p, n) < 0)
        return -1;
    cl->bytes_out += n;
    touch(e, &cl->c);
    return 0;
}

static void send_parse(Engine *e, Server *sv, Stmt *stmt) {
    uint8_t hdr[5];
    hdr[0] = 'P';
    wr32(hdr + 1, (uint32_t)(4 + stmt->name_len + 1 + stmt->key_len));
    send_server(e, sv, hdr, 5);
    send_server(e, sv, stmt->name, (size_t)stmt->name_len + 1);
    send_server(e, sv, stmt->key, stmt->key_len);
}

static void send_named(Engine *e, Server *sv, uint8_t tag, Stmt *stmt) {
    uint8_t msg[40];
    msg[0] = tag;
    wr32(msg + 1, (uint32_t)(4 + 1 + stmt->name_len + 1));
    msg[5] = 'S';
    memcpy(msg + 6, stmt->name, (size_t)stmt->name_len + 1);
    send_server(e, sv, msg, 6 + (size_t)stmt->name_len + 1);
}

/* ---- the pooling logic (argon/wire/pooling.py, function by function) ------------------------ */

static Request *push(Engine *e, Server *sv, uint8_t tag, uint8_t action) {
    Request *r = q_push(&sv->queue, tag, action);
    if (r == NULL) { /* out of memory: this server's state cannot be trusted any more */
        server_lost(e, sv);
    }
    return r;
}

static void fake(Engine *e, Client *cl, Server *sv, uint8_t tag) {
    if (sv == NULL || sv->queue.count == 0)
        send_client(e, cl, tag == 'P' ? PARSE_COMPLETE : CLOSE_COMPLETE, 5);
    else
        push(e, sv, tag, FAKE);
}

static void register_stmt(Engine *e, Server *sv, Stmt *stmt) {
    stmt->refs++;
    if (sp_add(&sv->prepared, stmt, 0) < 0) {
        reg_release(&e->registry, stmt);
        server_lost(e, sv);
        return;
    }
    while (sv->prepared.count > (size_t)e->max_prepared && sv->state != SV_CLOSED) {
        Stmt *victim = sp_remove(&sv->prepared, sv->prepared.oldest); /* its reference goes with the Close */
        send_named(e, sv, 'C', victim);
        Request *r = push(e, sv, 'C', SKIP);
        if (r == NULL) {
            reg_release(&e->registry, victim);
            return;
        }
        r->stmt = victim;
    }
}

static void ensure(Engine *e, Server *sv, Stmt *stmt) {
    SPrep *sp = sp_find(&sv->prepared, stmt);
    if (sp != NULL) {
        sp_touch(&sv->prepared, sp);
        return;
    }
    send_parse(e, sv, stmt);
    Request *r = push(e, sv, 'P', SKIP);
    if (r == NULL)
        return;
    r->stmt = stmt;
    register_stmt(e, sv, stmt);
}

static void close_name(Engine *e, Client *cl, const uint8_t *name, size_t n) {
    Stmt *stmt = cmap_del(cl->prepared, name, n);
    if (stmt != NULL)
        reg_release(&e->registry, stmt);
    fake(e, cl, cl->server, 'C');
}

static void link_to(Engine *e, Client *cl, Server *sv) {
    cl->server = sv;
    sv->client = cl;
    set_state(sv, SV_ACTIVE);
    touch(e, &cl->c);
    touch(e, &sv->c);
    uint8_t names = 0;
    size_t len = 0;
    for (int i = 0; i < NPARAMS; i++) {
        if (cl->params[i] != NULL && cl->params[i] != sv->params[i]) {
            names |= (uint8_t)(1u << i);
            len += 32 + 2 * cl->params[i]->len;
        }
    }
    if (!names)
        return;
    char *sql = malloc(len + 1), *q = sql;
    if (sql == NULL) {
        server_lost(e, sv);
        return;
    }
    for (int i = 0; i < NPARAMS; i++) {
        if (!(names & (1u << i)))
            continue;
        if (q != sql)
            *q++ = ';';
        q += sprintf(q, "SET %s TO E'", TRACKED[i]);
        for (uint32_t j = 0; j < cl->params[i]->len; j++) {
            char ch = cl->params[i]->s[j];
            if (ch == '\\' || ch == '\'')
                *q++ = ch;
            *q++ = ch;
        }
        *q++ = '\'';
    }
    *q++ = 0;
    Buf b = {0};
    int failed = frame_into(&b, 'Q', sql, (size_t)(q - sql), "", 0) < 0;
    free(sql);
    Request *r = failed ? NULL : push(e, sv, 'Q', SKIP);
    if (r == NULL) {
        buf_free(&b);
        if (!failed)
            return;
        server_lost(e, sv);
        return;
    }
    r->kind = SETVARS;
    r->names = names;
    send_server(e, sv, b.data, b.len);
    buf_free(&b);
}

static Server *idle_pop(Pool *p) {
    Server *sv = p->idle;
    idle_remove(p, sv);
    return sv;
}

static int acquire(Engine *e, Client *cl) {
    Pool *p = cl->pool;
    if (p->idle != NULL && !p->paused && p->wait_head == NULL) {
        link_to(e, cl, idle_pop(p));
        return 1;
    }
    if (!cl->waiting) {
        cl->waiting = 1;
        cl->waiting_since = e->now;
        cl->wprev = p->wait_tail;
        cl->wnext = NULL;
        if (p->wait_tail != NULL)
            p->wait_tail->wnext = cl;
        else
            p->wait_head = cl;
        p->wait_tail = cl;
        p->nwaiting++;
        touch(e, &cl->c); /* stop reading it */
        want(e, p);
    }
    return 0;
}

static void want(Engine *e, Pool *p) {
    if (p->paused)
        return;
    int need = p->nwaiting - p->opening, room = p->size - p->nservers - p->opening;
    int n = need < room ? need : room;
    for (int i = 0; i < n; i++) {
        p->opening++;
        emit(e, EV_WANT, p->id, 0, 0, 0);
    }
}

static void assign(Engine *e, Pool *p) {
    while (p->wait_head != NULL && p->idle != NULL && !p->paused) {
        Client *cl = p->wait_head;
        wait_remove(p, cl);
        p->wait_time += e->now - cl->waiting_since;
        p->wait_count++;
        link_to(e, cl, idle_pop(p));
        touch(e, &cl->c);
        run_client(e, cl);
    }
}

static void release(Engine *e, Server *sv) {
    Client *cl = sv->client;
    cl->server = NULL;
    sv->client = NULL;
    sv->pool->xact_count++;
    touch(e, &cl->c);
    touch(e, &sv->c);
    if (sv->dirty) {
        sv->dirty = 0;
        sp_clear(&sv->prepared, &e->registry);
        set_state(sv, SV_RESETTING);
        Request *r = push(e, sv, 'Q', SKIP);
        if (r == NULL)
            return;
        r->kind = RESET;
        send_server(e, sv, DISCARD_ALL, sizeof DISCARD_ALL);
    } else {
        idle(e, sv);
    }
}

static void idle(Engine *e, Server *sv) {
    if (sv->holds) {
        set_state(sv, SV_HELD);
        return;
    }
    set_state(sv, SV_IDLE);
    sv->idle_since = e->now;
    idle_push(sv->pool, sv);
    assign(e, sv->pool);
}

static void maybe_release(Engine *e, Server *sv) {
    Client *cl = sv->client;
    if (cl != NULL && sv->status == 'I' && sv->queue.count == 0 && !cl->copy_in && sv->state == SV_ACTIVE)
        release(e, sv);
}

static long forward(Engine *e, Client *cl, Server *sv, const uint8_t *buf, size_t pos, size_t total, size_t avail) {
    size_t n = total < avail ? total : avail;
    send_server(e, sv, buf + pos, n);
    cl->stream = (uint32_t)(total - n);
    return (long)n;
}

static long parse_message(Engine *e, Client *cl, Server *sv, const uint8_t *buf, size_t pos, size_t total, size_t avail) {
    int whole = avail >= total;
    if (buf[pos + 5] == 0) { /* the unnamed statement: passed on */
        if (!whole) {
            sv->dirty = 1;
        } else {
            const uint8_t *q = buf + pos + 6, *end = memchr(q, 0, total - 6);
            if (changes_session_in(q, end != NULL ? (size_t)(end - q) : total - 6, e->toks, e->words))
                sv->dirty = 1;
        }
        if (push(e, sv, 'P', FORWARD) == NULL)
            return -1;
        return forward(e, cl, sv, buf, pos, total, avail);
    }
    if (!whole) {
        if (total > INSPECT_LIMIT) {
            fail_client_text(e, cl, "54000", "prepared statement too long for the pooler (at most 1 MiB)");
            return -1;
        }
        return 0;
    }
    const uint8_t *body = buf + pos + 5, *end = memchr(body, 0, total - 5);
    if (end == NULL) {
        fail_client_text(e, cl, "08P01", "invalid Parse message");
        return -1;
    }
    size_t nlen = (size_t)(end - body), klen = total - 5 - nlen - 1;
    if (cmap_get(cl->prepared, body, nlen) != NULL) {
        char text[200];
        snprintf(text, sizeof text, "prepared statement \"%.*s\" already exists", (int)(nlen < 120 ? nlen : 120),
                 (const char *)body);
        fail_client_text(e, cl, "42P05", text);
        return -1;
    }
    if (cl->prepared != NULL && cl->prepared->count >= MAX_CLIENT_STATEMENTS) {
        fail_client_text(e, cl, "53400", "too many prepared statements for the pooler");
        return -1;
    }
    Pool *pool = cl->pool;
    Stmt *stmt = reg_acquire(&e->registry, pool->id, &pool->stmt_bytes, e->pool_statement_budget, end + 1, klen);
    if (stmt == NULL) {
        fail_client_text(e, cl, "53200", "the pooler's prepared statement memory is full");
        return -1;
    }
    if (cl->prepared == NULL)
        cl->prepared = calloc(1, sizeof *cl->prepared);
    if (cl->prepared == NULL || cmap_put(cl->prepared, body, nlen, stmt) < 0) {
        reg_release(&e->registry, stmt);
        fail_client_text(e, cl, "53200", "out of memory");
        return -1;
    }
    SPrep *sp = sp_find(&sv->prepared, stmt);
    if (sp != NULL) {
        sp_touch(&sv->prepared, sp);
        fake(e, cl, sv, 'P');
        return (long)total;
    }
    send_parse(e, sv, stmt);
    Request *r = push(e, sv, 'P', FORWARD);
    if (r == NULL)
        return -1;
    r->stmt = stmt;
    register_stmt(e, sv, stmt);
    return (long)total;
}

static long bind_message(Engine *e, Client *cl, Server *sv, const uint8_t *buf, size_t pos, size_t total, size_t avail) {
    int whole = avail >= total;
    size_t lim = total < avail ? total : avail;
    const uint8_t *start = buf + pos + 5, *stop = buf + pos + lim;
    const uint8_t *portal_end = start < stop ? memchr(start, 0, (size_t)(stop - start)) : NULL;
    const uint8_t *name_end = portal_end != NULL && portal_end + 1 < stop
                                  ? memchr(portal_end + 1, 0, (size_t)(stop - portal_end - 1)) : NULL;
    if (name_end == NULL) {
        if (whole || lim >= INSPECT_LIMIT) {
            fail_client_text(e, cl, "08P01", "invalid Bind message");
            return -1;
        }
        return 0;
    }
    const uint8_t *name = portal_end + 1;
    size_t nlen = (size_t)(name_end - name);
    Stmt *stmt = nlen ? cmap_get(cl->prepared, name, nlen) : NULL;
    if (stmt == NULL) { /* the unnamed statement, or a name the client never prepared: Postgres answers */
        if (push(e, sv, 'B', FORWARD) == NULL)
            return -1;
        return forward(e, cl, sv, buf, pos, total, avail);
    }
    ensure(e, sv, stmt);
    if (sv->state == SV_CLOSED || push(e, sv, 'B', FORWARD) == NULL)
        return -1;
    if (stmt->stateful)
        sv->dirty = 1;
    uint8_t hdr[5];
    hdr[0] = 'B';
    wr32(hdr + 1, (uint32_t)(total - 1 - nlen + stmt->name_len));
    send_server(e, sv, hdr, 5);
    send_server(e, sv, start, (size_t)(portal_end + 1 - start));
    send_server(e, sv, stmt->name, (size_t)stmt->name_len + 1);
    send_server(e, sv, name_end + 1, (size_t)(stop - name_end - 1));
    cl->stream = (uint32_t)(total - lim);
    return (long)lim;
}

/* Bytes consumed by a message answered without a server (0: it needs one). */
static size_t without_server(Engine *e, Client *cl, uint8_t tag, const uint8_t *buf, size_t pos, size_t total,
                             size_t avail) {
    if (tag == 'C' && buf[pos + 5] == 'S' && buf[pos + 6] != 0) {
        close_name(e, cl, buf + pos + 6, total - 7);
        return total;
    }
    if (tag == 'H')
        return total;
    if (tag == 'S') {
        send_client(e, cl, READY_IDLE, sizeof READY_IDLE);
        return total;
    }
    if (tag == 'd' || tag == 'c' || tag == 'f') { /* after the COPY ended on the server: dropped */
        size_t consumed = total < avail ? total : avail;
        cl->stream = (uint32_t)(total - consumed);
        return consumed;
    }
    return 0;
}

static long client_message(Engine *e, Client *cl, uint8_t tag, const uint8_t *buf, size_t pos, size_t total,
                           size_t avail) {
    Server *sv = cl->server;
    int whole = avail >= total;
    switch (tag) {
    case 'Q':
        cl->pool->query_count++;
        if (!whole || changes_session_in(buf + pos + 5, total - 6, e->toks, e->words))
            sv->dirty = 1;
        if (push(e, sv, 'Q', FORWARD) == NULL)
            return -1;
        return forward(e, cl, sv, buf, pos, total, avail);
    case 'P':
        return parse_message(e, cl, sv, buf, pos, total, avail);
    case 'B':
        return bind_message(e, cl, sv, buf, pos, total, avail);
    case 'D': {
        Stmt *stmt = buf[pos + 5] == 'S' && buf[pos + 6] != 0 ? cmap_get(cl->prepared, buf + pos + 6, total - 7) : NULL;
        if (stmt != NULL) {
            ensure(e, sv, stmt);
            if (sv->state == SV_CLOSED || push(e, sv, 'D', FORWARD) == NULL)
                return -1;
            send_named(e, sv, 'D', stmt);
            return (long)total;
        }
        if (push(e, sv, 'D', FORWARD) == NULL)
            return -1;
        return forward(e, cl, sv, buf, pos, total, avail);
    }
    case 'C':
        if (buf[pos + 5] == 'S' && buf[pos + 6] != 0) {
            close_name(e, cl, buf + pos + 6, total - 7);
            return (long)total;
        }
        if (push(e, sv, 'C', FORWARD) == NULL)
            return -1;
        return forward(e, cl, sv, buf, pos, total, avail);
    case 'E':
    case 'S':
        if (tag == 'S')
            cl->pool->query_count++;
        if (push(e, sv, tag, FORWARD) == NULL)
            return -1;
        return forward(e, cl, sv, buf, pos, total, avail);
    case 'F':
        sv->dirty = 1; /* a fast-path function call: the pooler cannot see what it does */
        if (push(e, sv, 'F', FORWARD) == NULL)
            return -1;
        return forward(e, cl, sv, buf, pos, total, avail);
    case 'c':
    case 'f': {
        if (sv->copy_mode && push(e, sv, tag, FORWARD) == NULL)
            return -1;
        cl->copy_in = 0;
        long consumed = forward(e, cl, sv, buf, pos, total, avail);
        maybe_release(e, sv);
        return consumed;
    }
    default: /* Flush, CopyData */
        return forward(e, cl, sv, buf, pos, total, avail);
    }
}

static int client_read_kind(uint8_t tag) {
    switch (tag) {
    case 'Q':
    case 'P':
        return 2; /* SQL */
    case 'B':
        return 3; /* BIND */
    case 'D':
    case 'C':
    case 'E':
    case 'S':
    case 'H':
    case 'X':
    case 'c':
    case 'f':
        return 0; /* BUFFER */
    case 'd':
    case 'F':
        return 1; /* STREAM */
    default:
        return -1;
    }
}

static size_t client_process(Engine *e, Client *cl, const uint8_t *buf, size_t len) {
    size_t pos = 0;
    while (!cl->c.closed) {
        size_t avail = len - pos;
        if (cl->stream) {
            if (!avail)
                break;
            size_t n = avail < cl->stream ? avail : cl->stream;
            if (cl->server != NULL)
                send_server(e, cl->server, buf + pos, n);
            pos += n;
            cl->stream -= (uint32_t)n;
            continue;
        }
        if (avail < 5)
            break;
        uint8_t tag = buf[pos];
        uint32_t length = rd32(buf + pos + 1);
        int how = client_read_kind(tag);
        if (how < 0 || length < 4 || length > MAX_MESSAGE) {
            fail_client_text(e, cl, "08P01", how < 0 ? "invalid frontend message type" : "invalid message length");
            break;
        }
        size_t total = 1 + (size_t)length;
        int whole = avail >= total;
        if (!whole && (how == 0 || (how == 2 && total <= SCAN_LIMIT))) {
            if (total > INSPECT_LIMIT)
                fail_client_text(e, cl, "08P01", "message too long for the pooler");
            break;
        }
        if (tag == 'X') {
            if (cl->server != NULL && cl->server->queue.count) { /* answers first, as Postgres does */
                cl->terminating = 1;
                pos += total;
                touch(e, &cl->c);
                break;
            }
            fail_client(e, cl, NULL, 0);
            break;
        }
        if ((tag == 'C' || tag == 'D') && (total < 7 || buf[pos + total - 1] != 0)) {
            fail_client_text(e, cl, "08P01", "invalid message format");
            break;
        }
        if (tag == 'P' && total < 9) {
            fail_client_text(e, cl, "08P01", "invalid Parse message");
            break;
        }
        if (cl->server == NULL) {
            size_t local = without_server(e, cl, tag, buf, pos, total, avail);
            if (local) {
                pos += local;
                continue;
            }
            if (!acquire(e, cl))
                break;
        }
        long consumed = client_message(e, cl, tag, buf, pos, total, avail);
        if (consumed <= 0)
            break;
        pos += (size_t)consumed;
    }
    return pos;
}

/* Process what is waiting in the client's own buffer (after it got a server). */
static void run_client(Engine *e, Client *cl) {
    if (cl->c.closed || buf_avail(&cl->c.in) == 0)
        return;
    size_t used = client_process(e, cl, cl->c.in.data + cl->c.in.off, buf_avail(&cl->c.in));
    if (!cl->c.closed)
        buf_consume(&cl->c.in, used);
}

static void client_data(Engine *e, Client *cl, const uint8_t *p, size_t n) {
    if (cl->c.closed)
        return;
    cl->bytes_in += n;
    cl->pool->last_activity = e->now;
    if (buf_avail(&cl->c.in) > 0) {
        if (buf_append(&cl->c.in, p, n) < 0) {
            fail_client_text(e, cl, "53200", "out of memory");
            return;
        }
        run_client(e, cl);
        return;
    }
    size_t used = client_process(e, cl, p, n);
    if (!cl->c.closed && used < n && buf_append(&cl->c.in, p + used, n - used) < 0)
        fail_client_text(e, cl, "53200", "out of memory");
}

/* ---- the server side ------------------------------------------------------------------------- */

static int own_query(Server *sv) {
    Request *h = q_head(&sv->queue);
    return h != NULL && h->action == SKIP && h->tag == 'Q';
}

/* Pop the oldest request if its tag is one of `tags`; 1 if it was. */
static int pop_if(Server *sv, const char *tags, Request *out) {
    Request *h = q_head(&sv->queue);
    if (h == NULL || strchr(tags, h->tag) == NULL)
        return 0;
    Request r = q_pop(&sv->queue);
    if (out != NULL)
        *out = r;
    else
        free(r.error);
    return 1;
}

static void clear_until(Engine *e, Server *sv, const char *tags) {
    while (sv->queue.count) {
        Request r = q_pop(&sv->queue);
        free(r.error);
        if (r.stmt != NULL) {
            if (r.tag == 'P') {
                SPrep *sp = sp_find(&sv->prepared, r.stmt);
                if (sp != NULL)
                    reg_release(&e->registry, sp_remove(&sv->prepared, sp));
            } else if (r.tag == 'C') {
                if (sp_add(&sv->prepared, r.stmt, 1) < 0)
                    reg_release(&e->registry, r.stmt);
            }
        }
        if (strchr(tags, r.tag) != NULL)
            break;
    }
}

static int tracked_index(const uint8_t *name, size_t n) {
    for (int i = 0; i < NPARAMS; i++)
        if (strlen(TRACKED[i]) == n && strncasecmp((const char *)name, TRACKED[i], n) == 0)
            return i;
    return -1;
}

static void parameter(Engine *e, Server *sv, const uint8_t *m, size_t n, Client *cl) {
    const uint8_t *name = m + 5, *end = m + n;
    const uint8_t *name_end = memchr(name, 0, (size_t)(end - name));
    if (name_end == NULL)
        return;
    const uint8_t *value = name_end + 1;
    const uint8_t *value_end = value < end ? memchr(value, 0, (size_t)(end - value)) : NULL;
    if (value_end == NULL)
        return;
    int i = tracked_index(name, (size_t)(name_end - name));
    if (i < 0)
        return;
    Str *v = str_get(&e->strings, (const char *)value, (size_t)(value_end - value));
    if (v == NULL)
        return;
    str_put(&e->strings, sv->params[i]);
    sv->params[i] = v;
    if (cl != NULL) {
        str_put(&e->strings, cl->params[i]);
        cl->params[i] = str_ref(v);
    }
}

static void flush_fakes(Engine *e, Server *sv, Client *cl) {
    Request *h;
    while ((h = q_head(&sv->queue)) != NULL && h->action == FAKE) {
        Request r = q_pop(&sv->queue);
        if (cl != NULL)
            send_client(e, cl, r.tag == 'P' ? PARSE_COMPLETE : CLOSE_COMPLETE, 5);
    }
}

static void broken(Engine *e, Server *sv) {
    server_lost(e, sv);
}

static void own_query_message(Engine *e, Server *sv, uint8_t tag, const uint8_t *m, size_t n) {
    Request *h = q_head(&sv->queue);
    if (tag == 'S') {
        parameter(e, sv, m, n, NULL);
    } else if (tag == 'E') {
        if (h->error == NULL) { /* its M field */
            const uint8_t *p = m + 5, *end = m + n;
            const char *text = "error";
            size_t len = 5;
            while (p < end && *p) {
                const uint8_t *f = memchr(p + 1, 0, (size_t)(end - p - 1));
                if (f == NULL)
                    break;
                if (*p == 'M') {
                    text = (const char *)p + 1;
                    len = (size_t)(f - p - 1);
                }
                p = f + 1;
            }
            h->error = strndup(text, len);
        }
    } else if (tag == 'Z') {
        Request r = q_pop(&sv->queue);
        sv->status = n == 6 ? m[5] : 'I';
        Client *cl = sv->client;
        if (r.kind == RESET) {
            if (r.error != NULL || sv->status != 'I')
                close_server(e, sv);
            else
                idle(e, sv);
        } else if (cl != NULL) {
            if (r.error != NULL) { /* the client's startup values were refused (PgBouncer: closes it) */
                cl->server = NULL;
                sv->client = NULL;
                close_server(e, sv);
                fail_client_text(e, cl, "22023", r.error);
                free(r.error);
                return;
            }
            for (int i = 0; i < NPARAMS; i++) {
                if ((r.names & (1u << i)) && sv->params[i] != NULL) {
                    str_put(&e->strings, cl->params[i]);
                    cl->params[i] = str_ref(sv->params[i]);
                }
            }
        }
        free(r.error);
        if (sv->state != SV_CLOSED)
            flush_fakes(e, sv, sv->client);
    }
}

static void server_message(Engine *e, Server *sv, uint8_t tag, const uint8_t *m, size_t n) {
    Client *cl = sv->client;
    if (own_query(sv)) {
        own_query_message(e, sv, tag, m, n);
        return;
    }
    int fwd = cl != NULL;
    Request r;
    switch (tag) {
    case 'Z':
        if (n != 6) {
            broken(e, sv);
            return;
        }
        if (!pop_if(sv, "SQF", NULL) && sv->query_failed)
            clear_until(e, sv, "S");
        sv->query_failed = 0;
        sv->status = m[5];
        break;
    case 'S':
        parameter(e, sv, m, n, cl);
        break;
    case 'E':
        if (sv->copy_mode) {
            sv->copy_mode = 0;
            clear_until(e, sv, "cf");
        }
        sv->query_failed = 1;
        break;
    case 'C':
        if (sv->copy_mode) {
            sv->copy_mode = 0;
            clear_until(e, sv, "c");
        }
        if ((n == 5 + 15 && memcmp(m + 5, "DEALLOCATE ALL", 15) == 0) ||
            (n == 5 + 12 && memcmp(m + 5, "DISCARD ALL", 12) == 0)) {
            sp_clear(&sv->prepared, &e->registry);
            if (cl != NULL)
                cmap_clear(cl->prepared, &e->registry);
        }
        pop_if(sv, "E", NULL);
        break;
    case 'G':
    case 'W':
        sv->copy_mode = 1;
        if (cl != NULL)
            cl->copy_in = 1;
        break;
    case '1':
        if (pop_if(sv, "P", &r) && r.action == SKIP)
            fwd = 0;
        break;
    case '2':
        pop_if(sv, "B", NULL);
        break;
    case '3':
        if (pop_if(sv, "C", &r) && r.action == SKIP) {
            fwd = 0;
            if (r.stmt != NULL)
                reg_release(&e->registry, r.stmt);
        }
        break;
    case 'n':
    case 'T':
        pop_if(sv, "D", NULL);
        break;
    case 'I':
    case 's':
        pop_if(sv, "E", NULL);
        break;
    default:
        break;
    }
    if (fwd)
        send_client(e, cl, m, n);
    flush_fakes(e, sv, cl);
    if (tag == 'Z') {
        maybe_release(e, sv);
        if (cl != NULL && cl->terminating && (cl->server == NULL || sv->queue.count == 0))
            fail_client(e, cl, NULL, 0); /* its answers are out; a transaction still open rolls back */
    }
}

static size_t server_process(Engine *e, Server *sv, const uint8_t *buf, size_t len) {
    size_t pos = 0;
    while (sv->state != SV_CLOSED) {
        size_t avail = len - pos;
        if (sv->stream) {
            if (!avail)
                break;
            size_t n = avail < sv->stream ? avail : sv->stream;
            if (sv->stream_to_client && sv->client != NULL)
                send_client(e, sv->client, buf + pos, n);
            pos += n;
            sv->stream -= (uint32_t)n;
            continue;
        }
        if (avail < 5)
            break;
        uint8_t tag = buf[pos];
        size_t total = 1 + (size_t)rd32(buf + pos + 1);
        if (total < 5) {
            broken(e, sv);
            break;
        }
        if (tag == 'D' || tag == 'd' || tag == 'V') {
            sv->stream = (uint32_t)total;
            sv->stream_to_client = (uint8_t)!own_query(sv);
            continue;
        }
        if (avail < total) {
            if (total > SERVER_BUFFER_LIMIT)
                broken(e, sv);
            break;
        }
        server_message(e, sv, tag, buf + pos, total);
        pos += total;
    }
    return pos;
}

static void run_server(Engine *e, Server *sv) {
    if (sv->state == SV_CLOSED || buf_avail(&sv->c.in) == 0)
        return;
    size_t used = server_process(e, sv, sv->c.in.data + sv->c.in.off, buf_avail(&sv->c.in));
    if (sv->state != SV_CLOSED)
        buf_consume(&sv->c.in, used);
}

static void server_data(Engine *e, Server *sv, const uint8_t *p, size_t n) {
    if (sv->state == SV_CLOSED)
        return;
    sv->pool->last_activity = e->now;
    if (buf_avail(&sv->c.in) > 0) {
        if (buf_append(&sv->c.in, p, n) < 0) {
            broken(e, sv);
            return;
        }
        run_server(e, sv);
        return;
    }
    size_t used = server_process(e, sv, p, n);
    if (sv->state != SV_CLOSED && used < n && buf_append(&sv->c.in, p + used, n - used) < 0)
        broken(e, sv);
}

/* ---- ends -------------------------------------------------------------------------------------- */

static void discard_input(int fd) {
    char sink[16384];
    for (int i = 0; i < 64; i++) {
        ssize_t n = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
        if (n <= 0 && !(n < 0 && errno == EINTR))
            break;
    }
}

static int flush_conn(Engine *e, Conn *c);

/* Close the socket (after a last best-effort write of what is queued for it) and put the
   connection on the dead list; its memory goes at the end of the event batch. */
static void conn_close(Engine *e, Conn *c) {
    if (c->closed)
        return;
    (void)flush_conn(e, c);
    c->closed = 1;
    if (c->registered)
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    c->registered = 0;
    discard_input(c->fd);
    close(c->fd);
    cm_del(&conns, c);
    c->dnext = e->dead;
    e->dead = c;
}

static void release_client_memory(Engine *e, Client *cl) {
    if (cl->prepared != NULL) {
        cmap_clear(cl->prepared, &e->registry);
        free(cl->prepared->buckets);
        free(cl->prepared);
        cl->prepared = NULL;
    }
    for (int i = 0; i < NPARAMS; i++) {
        str_put(&e->strings, cl->params[i]);
        cl->params[i] = NULL;
    }
}

static void client_lost(Engine *e, Client *cl) {
    if (cl->c.closed)
        return;
    Pool *p = cl->pool;
    if (cl->waiting)
        wait_remove(p, cl);
    if (cl->pprev != NULL)
        cl->pprev->pnext = cl->pnext;
    else
        p->clients = cl->pnext;
    if (cl->pnext != NULL)
        cl->pnext->pprev = cl->pprev;
    cl->pnext = cl->pprev = NULL;
    p->nclients--;
    Server *sv = cl->server;
    if (sv != NULL) {
        cl->server = NULL;
        sv->client = NULL;
        close_server(e, sv);
    }
    release_client_memory(e, cl);
    if (cl->ssl != NULL && !cl->c.eof) { /* what is queued (an error), then close_notify */
        (void)flush_conn(e, &cl->c);
        if (buf_avail(&cl->c.out) == 0 && buf_avail(&cl->plain) == 0) {
            ossl.ERR_clear_error();
            ossl.SSL_shutdown(cl->ssl);
            ossl.ERR_clear_error();
        }
    }
    conn_close(e, &cl->c);
    pthread_mutex_lock(&e->lock);
    e->clients_open--;
    pthread_mutex_unlock(&e->lock);
    emit(e, EV_CLIENT_END, cl->c.id, cl->bytes_in, cl->bytes_out, 0);
}

static void fail_client(Engine *e, Client *cl, const uint8_t *error, size_t error_len) {
    if (cl->c.closed)
        return;
    if (error != NULL)
        send_client(e, cl, error, error_len);
    client_lost(e, cl);
}

static void drop_server(Engine *e, Server *sv) {
    Pool *p = sv->pool;
    if (sv->state == SV_IDLE)
        idle_remove(p, sv);
    set_state(sv, SV_CLOSED);
    if (sv->sprev != NULL)
        sv->sprev->snext = sv->snext;
    else
        p->servers = sv->snext;
    if (sv->snext != NULL)
        sv->snext->sprev = sv->sprev;
    sv->snext = sv->sprev = NULL;
    p->nservers--;
    sp_free(&sv->prepared, &e->registry);
    for (uint32_t i = 0; i < sv->queue.count; i++) {
        Request *r = &sv->queue.items[(sv->queue.head + i) % sv->queue.cap];
        if (r->stmt != NULL && r->tag == 'C')
            reg_release(&e->registry, r->stmt);
    }
    q_free(&sv->queue);
    for (int i = 0; i < NPARAMS; i++) {
        str_put(&e->strings, sv->params[i]);
        sv->params[i] = NULL;
    }
    conn_close(e, &sv->c);
    pthread_mutex_lock(&e->lock);
    e->servers_open--;
    pthread_mutex_unlock(&e->lock);
    emit(e, EV_SERVER_END, sv->c.id, 0, 0, 0);
}

static void close_server(Engine *e, Server *sv) {
    if (sv->state == SV_CLOSED)
        return;
    Client *cl = sv->client;
    if (cl != NULL) {
        cl->server = NULL;
        sv->client = NULL;
        touch(e, &cl->c);
    }
    drop_server(e, sv);
    want(e, sv->pool);
}

static void server_lost(Engine *e, Server *sv) {
    if (sv->state == SV_CLOSED)
        return;
    Client *cl = sv->client;
    sv->client = NULL;
    drop_server(e, sv);
    if (cl != NULL) {
        cl->server = NULL;
        fail_client(e, cl, NULL, 0);
    }
    want(e, sv->pool);
}

/* ---- pools: timeouts, quiescing, dropping ---------------------------------------------------- */

static void tick(Engine *e) {
    for (size_t b = 0; b < e->npool_buckets; b++) {
        for (Pool *p = e->pools[b]; p != NULL; p = p->next) {
            while (p->wait_head != NULL && e->now - p->wait_head->waiting_since > e->wait_timeout)
                fail_client_text(e, p->wait_head, "08P01", "query_wait_timeout");
            Server *sv = p->idle;
            while (sv != NULL) {
                Server *next = sv->inext;
                if (e->now - sv->idle_since > e->idle_timeout)
                    close_server(e, sv);
                sv = next;
            }
        }
    }
}

/* Quiesce a pool before its compute stops (pooling.py's pause): 1 if a server is in use or being
   opened (and, unless `force`, nothing changed); else, or with `force`, nothing is handed out any
   more and the idle servers are closed. */
static int pause_pool(Engine *e, Pool *p, int force) {
    int busy = p->opening || p->nactive || p->nused;
    if (busy && !force)
        return 1;
    p->paused = 1;
    while (p->idle != NULL)
        close_server(e, p->idle);
    return busy;
}

static void resume_pool(Engine *e, Pool *p) {
    p->paused = 0;
    assign(e, p);
    want(e, p);
}

static void drop_pool(Engine *e, Pool *p) {
    while (p->clients != NULL)
        fail_client(e, p->clients, NULL, 0);
    while (p->servers != NULL)
        close_server(e, p->servers);
    pthread_mutex_lock(&e->lock);
    Pool **slot = &e->pools[p->id & (e->npool_buckets - 1)];
    while (*slot != p)
        slot = &(*slot)->next;
    *slot = p->next;
    e->npools--;
    pthread_mutex_unlock(&e->lock);
    free(p);
}

/* ---- sockets: flushing, reading, TLS, epoll masks -------------------------------------------- */

/* Move what OpenSSL wrote into the client's write BIO to the socket: straight from the scratch
   buffer while nothing is queued before it (no copy into the out buffer, which would be allocated
   and freed again for every response), the rest to the out buffer for the next flush. */
static int tls_pull(Engine *e, Client *cl) {
    void *wbio = ossl.SSL_get_wbio(cl->ssl);
    for (;;) {
        long pending = ossl.BIO_ctrl(wbio, BIO_CTRL_PENDING, 0, NULL);
        if (pending <= 0)
            return 0;
        int n = ossl.BIO_read(wbio, e->tlsbuf, pending < READ_CHUNK ? (int)pending : READ_CHUNK);
        if (n <= 0)
            return 0;
        size_t off = 0;
        while (buf_avail(&cl->c.out) == 0 && off < (size_t)n) {
            ssize_t w = send(cl->c.fd, e->tlsbuf + off, (size_t)n - off, MSG_NOSIGNAL);
            if (w > 0)
                off += (size_t)w;
            else if (w < 0 && errno == EINTR)
                continue;
            else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            else
                return -1;
        }
        if (off < (size_t)n && buf_append(&cl->c.out, e->tlsbuf + off, (size_t)n - off) < 0)
            return -1;
    }
}

/* Send what is queued for a connection (encrypting a TLS client's plaintext first). 0 when all is
   sent or the socket is full, -1 when the connection is broken. */
static int flush_conn(Engine *e, Conn *c) {
    if (c->closed)
        return 0;
    if (c->kind == CONN_CLIENT) {
        Client *cl = (Client *)c;
        if (cl->ssl != NULL) {
            size_t off = 0, n = buf_avail(&cl->plain);
            const uint8_t *p = cl->plain.data + cl->plain.off;
            while (off < n) {
                size_t chunk = n - off < READ_CHUNK ? n - off : READ_CHUNK;
                ossl.ERR_clear_error(); /* the thread's error queue is shared by every connection */
                int w = ossl.SSL_write(cl->ssl, p + off, (int)chunk);
                if (w <= 0)
                    return -1; /* memory BIOs never want more: a real error */
                off += (size_t)w;
                if (tls_pull(e, cl) < 0)
                    return -1;
            }
            buf_consume(&cl->plain, n);
            if (tls_pull(e, cl) < 0)
                return -1;
        }
    }
    Buf *b = &c->out;
    while (buf_avail(b) > 0) {
        ssize_t w = send(c->fd, b->data + b->off, buf_avail(b), MSG_NOSIGNAL);
        if (w > 0) {
            buf_consume(b, (size_t)w);
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            return -1;
        }
    }
    return 0;
}

static Conn *peer_of(Conn *c) {
    if (c->kind == CONN_CLIENT) {
        Client *cl = (Client *)c;
        return cl->server != NULL ? &cl->server->c : NULL;
    }
    Server *sv = (Server *)c;
    return sv->client != NULL ? &sv->client->c : NULL;
}

/* Whether a connection may be read now: not a waiting client, and not while what it feeds is
   still waiting to be sent (its peer's out buffer), nor while more than TLS_OUT_CAP waits for it
   (a client's reads can make output for itself: local answers, TLS records). */
static int may_read(Conn *c) {
    if (c->closed || c->eof)
        return 0;
    if (c->kind == CONN_CLIENT && (((Client *)c)->waiting || ((Client *)c)->terminating))
        return 0;
    Conn *peer = peer_of(c);
    if (peer != NULL && buf_avail(&peer->out) > 0)
        return 0;
    return buf_avail(&c->out) <= TLS_OUT_CAP;
}

static void set_mask(Engine *e, Conn *c) {
    if (c->closed)
        return;
    uint32_t mask = 0;
    if (may_read(c))
        mask |= EPOLLIN;
    if (buf_avail(&c->out) > 0)
        mask |= EPOLLOUT;
    if (mask == c->mask && (mask != 0) == c->registered)
        return;
    struct epoll_event ev = {.events = mask, .data.ptr = c};
    if (mask == 0) {
        if (c->registered)
            epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        c->registered = 0;
    } else if (c->registered) {
        epoll_ctl(e->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    } else {
        epoll_ctl(e->epfd, EPOLL_CTL_ADD, c->fd, &ev);
        c->registered = 1;
    }
    c->mask = mask;
}

static void lost(Engine *e, Conn *c) {
    if (c->kind == CONN_CLIENT)
        client_lost(e, (Client *)c);
    else
        server_lost(e, (Server *)c);
}

/* Flush every connection touched since the last time, then re-arm them and their peers (flushing
   can end connections, which touches others: until nothing is left). All are flushed before any is
   re-armed: a connection may be read only once its peer's output is out (may_read), so arming the
   client before its server's query is sent would take it out of the epoll set and put it back, two
   epoll_ctl calls per statement. */
static void arm_later(Engine *e, Conn *c) {
    if (e->narm == e->arm_cap) {
        size_t cap = e->arm_cap ? e->arm_cap * 2 : 64;
        Conn **grown = realloc(e->arm, cap * sizeof *grown);
        if (grown == NULL) { /* no room to defer: arm it now (correct, only more epoll_ctl calls) */
            set_mask(e, c);
            return;
        }
        e->arm = grown;
        e->arm_cap = cap;
    }
    e->arm[e->narm++] = c;
}

static void settle(Engine *e) {
    while (e->touched != NULL) {
        while (e->touched != NULL) {
            Conn *c = e->touched;
            e->touched = c->tnext;
            c->tnext = NULL;
            c->touched = 0;
            if (c->closed)
                continue;
            if (flush_conn(e, c) < 0) {
                c->eof = 1;
                lost(e, c);
                continue;
            }
            arm_later(e, c);
        }
        /* closed connections are freed only after the event batch (free_dead): safe to look at */
        for (size_t i = 0; i < e->narm; i++) {
            Conn *c = e->arm[i];
            if (c->closed)
                continue;
            set_mask(e, c);
            Conn *peer = peer_of(c);
            if (peer != NULL && !peer->touched && !peer->closed)
                set_mask(e, peer);
        }
        e->narm = 0;
    }
}

/* Decrypt what the client's read BIO holds and process the plaintext. 1 at close_notify. */
static int tls_receive(Engine *e, Client *cl) {
    for (;;) {
        if (cl->c.closed)
            return 0;
        ossl.ERR_clear_error();
        int n = ossl.SSL_read(cl->ssl, e->tlsbuf, READ_CHUNK);
        int rc;
        if (n > 0) {
            client_data(e, cl, e->tlsbuf, (size_t)n);
            /* SSL_read returns one record at most. Nothing left in the read BIO and nothing buffered
               in OpenSSL (the rest of this record, or bytes read ahead): the next SSL_read could only
               want more (one call, an error-queue clear and an SSL_get_error saved per record). */
            if (cl->c.closed || ossl.SSL_has_pending(cl->ssl) ||
                ossl.BIO_ctrl(ossl.SSL_get_rbio(cl->ssl), BIO_CTRL_PENDING, 0, NULL) > 0)
                continue;
            rc = 0;
        } else {
            int err = ossl.SSL_get_error(cl->ssl, n);
            rc = err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE ? 0 : err == SSL_ERROR_ZERO_RETURN ? 1 : -1;
        }
        if (!cl->c.closed && tls_pull(e, cl) < 0) /* a KeyUpdate answer, an alert */
            return -1;
        if (!cl->c.closed)
            touch(e, &cl->c);
        return rc;
    }
}

static void on_readable(Engine *e, Conn *c) {
    ssize_t n;
    do {
        n = recv(c->fd, e->buf, READ_CHUNK, 0);
    } while (n < 0 && errno == EINTR);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
        c->eof = 1;
        lost(e, c);
        return;
    }
    if (n < 0)
        return;
    if (c->kind == CONN_SERVER) {
        server_data(e, (Server *)c, e->buf, (size_t)n);
        return;
    }
    Client *cl = (Client *)c;
    if (cl->ssl == NULL) {
        client_data(e, cl, e->buf, (size_t)n);
        return;
    }
    if (ossl.BIO_write(ossl.SSL_get_rbio(cl->ssl), e->buf, (int)n) != (int)n) {
        lost(e, c);
        return;
    }
    int rc = tls_receive(e, cl);
    if (rc != 0 && !cl->c.closed) {
        c->eof = 1;
        lost(e, c);
    }
}

/* ---- events (to Python) and commands (from Python) ------------------------------------------ */

static void emit(Engine *e, int type, uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
    pthread_mutex_lock(&e->lock);
    if (e->nevents == e->events_cap) {
        size_t cap = e->events_cap ? e->events_cap * 2 : 256;
        Event *grown = realloc(e->events, cap * sizeof *grown);
        if (grown == NULL) { /* cannot happen in practice; dropping one would leak a Python record */
            pthread_mutex_unlock(&e->lock);
            return;
        }
        e->events = grown;
        e->events_cap = cap;
    }
    e->events[e->nevents++] = (Event){type, a, b, c, d};
    pthread_mutex_unlock(&e->lock);
    signal_fd(e->event_fd);
}

static void free_command(Command *cmd) {
    free(cmd->data);
    free(cmd->pending);
    for (int i = 0; i < NPARAMS; i++)
        free(cmd->params[i]);
    free(cmd);
}

static void set_params(Engine *e, Str **dst, Command *cmd) {
    for (int i = 0; i < NPARAMS; i++)
        dst[i] = cmd->params[i] != NULL ? str_get(&e->strings, cmd->params[i], cmd->param_len[i]) : NULL;
}

static void add_client(Engine *e, Command *cmd) {
    Pool *p = pool_find(e, cmd->pool);
    Client *cl = p != NULL ? calloc(1, sizeof *cl) : NULL;
    if (cl == NULL) {
        close(cmd->fd);
        pthread_mutex_lock(&e->lock);
        e->clients_open--;
        pthread_mutex_unlock(&e->lock);
        emit(e, EV_CLIENT_END, cmd->id, 0, 0, 0);
        return;
    }
    cl->c.fd = cmd->fd;
    cl->c.kind = CONN_CLIENT;
    cl->c.id = cmd->id;
    cl->ssl = cmd->ssl;
    if (cl->ssl != NULL) /* an idle client keeps no record buffers (OpenSSL frees them when empty) */
        ossl.SSL_ctrl(cl->ssl, SSL_CTRL_MODE, SSL_MODE_RELEASE_BUFFERS, NULL);
    cl->pool = p;
    set_params(e, cl->params, cmd);
    cl->pnext = p->clients;
    if (p->clients != NULL)
        p->clients->pprev = cl;
    p->clients = cl;
    p->nclients++;
    cm_put(&conns, &cl->c);
    if (cl->ssl != NULL && tls_pull(e, cl) < 0) { /* records Python left in the BIO go first */
        client_lost(e, cl);
        return;
    }
    send_client(e, cl, cmd->data, cmd->data_len);
    touch(e, &cl->c);
    if (cmd->pending_len)
        client_data(e, cl, cmd->pending, cmd->pending_len);
    if (cl->ssl != NULL && !cl->c.closed) { /* ciphertext Python read but did not decrypt */
        int rc = tls_receive(e, cl);
        if (rc != 0 && !cl->c.closed)
            client_lost(e, cl);
    }
}

static void add_server(Engine *e, Command *cmd) {
    Pool *p = pool_find(e, cmd->pool);
    Server *sv = p != NULL ? calloc(1, sizeof *sv) : NULL;
    if (sv == NULL) {
        close(cmd->fd);
        if (p != NULL && cmd->requested && p->opening > 0)
            p->opening--;
        pthread_mutex_lock(&e->lock);
        e->servers_open--;
        pthread_mutex_unlock(&e->lock);
        emit(e, EV_SERVER_END, cmd->id, 0, 0, 0);
        return;
    }
    sv->c.fd = cmd->fd;
    sv->c.kind = CONN_SERVER;
    sv->c.id = cmd->id;
    sv->pool = p;
    sv->status = 'I';
    sv->state = 255; /* none yet: set_state counts from here */
    q_init(&sv->queue);
    set_params(e, sv->params, cmd);
    if (cmd->requested && p->opening > 0)
        p->opening--;
    sv->snext = p->servers;
    if (p->servers != NULL)
        p->servers->sprev = sv;
    p->servers = sv;
    p->nservers++;
    cm_put(&conns, &sv->c);
    touch(e, &sv->c);
    idle(e, sv);
    if (cmd->pending_len)
        server_data(e, sv, cmd->pending, cmd->pending_len);
}

static void run_command(Engine *e, Command *cmd) {
    Pool *p;
    switch (cmd->type) {
    case CMD_ADD_POOL:
        if (pool_find(e, cmd->pool) != NULL)
            break;
        p = calloc(1, sizeof *p);
        if (p == NULL)
            break;
        p->id = cmd->pool;
        p->size = cmd->size > 0 ? cmd->size : 1;
        pthread_mutex_lock(&e->lock);
        if (e->npools >= e->npool_buckets) {
            size_t nb = e->npool_buckets ? e->npool_buckets * 2 : 64;
            Pool **grown = calloc(nb, sizeof *grown);
            if (grown != NULL) {
                for (size_t i = 0; i < e->npool_buckets; i++) {
                    Pool *q = e->pools[i];
                    while (q != NULL) {
                        Pool *next = q->next;
                        q->next = grown[q->id & (nb - 1)];
                        grown[q->id & (nb - 1)] = q;
                        q = next;
                    }
                }
                free(e->pools);
                e->pools = grown;
                e->npool_buckets = nb;
            }
        }
        if (e->npool_buckets == 0) {
            pthread_mutex_unlock(&e->lock);
            free(p);
            break;
        }
        p->next = e->pools[p->id & (e->npool_buckets - 1)];
        e->pools[p->id & (e->npool_buckets - 1)] = p;
        e->npools++;
        pthread_mutex_unlock(&e->lock);
        break;
    case CMD_RESIZE:
        if ((p = pool_find(e, cmd->pool)) != NULL) {
            p->size = cmd->size > 0 ? cmd->size : 1;
            want(e, p);
        }
        break;
    case CMD_DROP_POOL:
        if ((p = pool_find(e, cmd->pool)) != NULL)
            drop_pool(e, p);
        break;
    case CMD_ADD_CLIENT:
        add_client(e, cmd);
        break;
    case CMD_ADD_SERVER:
        add_server(e, cmd);
        break;
    case CMD_FAILED:
        if ((p = pool_find(e, cmd->pool)) != NULL) {
            if (p->opening > 0)
                p->opening--;
            if (cmd->data != NULL && p->nservers == 0 && p->opening == 0) {
                while (p->wait_head != NULL)
                    fail_client(e, p->wait_head, cmd->data, cmd->data_len);
            }
        }
        break;
    case CMD_CANCEL: {
        Client *cl = (Client *)cm_get(&conns, cmd->id, CONN_CLIENT);
        Server *sv = cl != NULL ? cl->server : NULL;
        if (sv != NULL && sv->state != SV_CLOSED) {
            sv->holds++;
            emit(e, EV_CANCEL, cmd->token, sv->c.id, 0, 0);
        } else {
            emit(e, EV_CANCEL, cmd->token, 0, 0, 0);
        }
        break;
    }
    case CMD_UNHOLD: {
        Server *sv = (Server *)cm_get(&conns, cmd->id, CONN_SERVER);
        if (sv != NULL && sv->holds > 0 && --sv->holds == 0 && sv->state == SV_HELD)
            idle(e, sv);
        break;
    }
    case CMD_PAUSE:
    case CMD_PAUSE_FORCE:
        p = pool_find(e, cmd->pool);
        emit(e, EV_PAUSED, cmd->token, p != NULL ? (uint64_t)pause_pool(e, p, cmd->type == CMD_PAUSE_FORCE) : 0,
             0, 0);
        break;
    case CMD_RESUME:
        if ((p = pool_find(e, cmd->pool)) != NULL)
            resume_pool(e, p);
        break;
    case CMD_CLOSE_CLIENT: {
        Client *cl = (Client *)cm_get(&conns, cmd->id, CONN_CLIENT);
        if (cl != NULL)
            client_lost(e, cl);
        break;
    }
    case CMD_LIMITS:
        e->wait_timeout = cmd->wait_timeout;
        e->idle_timeout = cmd->idle_timeout;
        e->max_prepared = cmd->max_prepared > 0 ? cmd->max_prepared : 1;
        if (cmd->statement_budget > 0)
            e->pool_statement_budget = (size_t)cmd->statement_budget;
        break;
    default:
        break;
    }
}

static int on_wake(Engine *e) {
    drain_fd(e->wake_fd);
    pthread_mutex_lock(&e->lock);
    Command *cmds = e->commands;
    e->commands = e->commands_tail = NULL;
    int stop = e->stop;
    pthread_mutex_unlock(&e->lock);
    while (cmds != NULL) {
        Command *next = cmds->next;
        run_command(e, cmds);
        free_command(cmds);
        cmds = next;
    }
    return stop;
}

static void free_dead(Engine *e) {
    while (e->dead != NULL) {
        Conn *c = e->dead;
        e->dead = c->dnext;
        buf_free(&c->out);
        buf_free(&c->in);
        if (c->kind == CONN_CLIENT)
            buf_free(&((Client *)c)->plain);
        free(c);
    }
}

static void *engine_main(void *arg) {
    Engine *e = (Engine *)arg;
    struct epoll_event events[MAX_EVENTS];
    e->last_tick = now_monotonic();
    for (;;) {
        int n = epoll_wait(e->epfd, events, MAX_EVENTS, 500);
        if (n < 0 && errno != EINTR)
            break;
        e->now = now_monotonic();
        int stop = 0;
        for (int i = 0; i < n; i++) {
            if (events[i].data.u64 == WAKE_TAG) {
                stop |= on_wake(e);
                continue;
            }
            Conn *c = events[i].data.ptr;
            if (c->closed)
                continue;
            uint32_t ev = events[i].events;
            int hangup = (ev & (EPOLLHUP | EPOLLERR)) != 0;
            if ((ev & EPOLLOUT) || (hangup && buf_avail(&c->out) > 0)) {
                if (flush_conn(e, c) < 0) {
                    c->eof = 1;
                    lost(e, c);
                    continue;
                }
                touch(e, c); /* re-arm it and its peer */
            }
            if ((ev & EPOLLIN) || hangup) {
                if (may_read(c) || hangup)
                    on_readable(e, c);
            }
            settle(e);
        }
        if (e->now - e->last_tick >= TICK_SECONDS) {
            e->last_tick = e->now;
            tick(e);
        }
        settle(e);
        free_dead(e);
        if (stop)
            break;
    }
    return NULL;
}

/* ---- the Python side ------------------------------------------------------------------------- */

static PyTypeObject EngineType;

static void push_command(Engine *e, Command *cmd) {
    pthread_mutex_lock(&e->lock);
    cmd->next = NULL;
    if (e->commands_tail != NULL)
        e->commands_tail->next = cmd;
    else
        e->commands = cmd;
    e->commands_tail = cmd;
    pthread_mutex_unlock(&e->lock);
    signal_fd(e->wake_fd);
}

static Command *new_command(Engine *e, int type) {
    if (!e->running) {
        PyErr_SetString(PyExc_RuntimeError, "the pooler engine is closed");
        return NULL;
    }
    Command *cmd = calloc(1, sizeof *cmd);
    if (cmd == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    cmd->type = type;
    cmd->fd = -1;
    return cmd;
}

static int copy_bytes(Py_buffer *view, uint8_t **out, size_t *len) {
    *len = (size_t)view->len;
    *out = NULL;
    if (view->len == 0)
        return 0;
    *out = malloc((size_t)view->len);
    if (*out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(*out, view->buf, (size_t)view->len);
    return 0;
}

/* params: a tuple of NPARAMS str or None */
static int copy_params(PyObject *params, Command *cmd) {
    if (!PyTuple_Check(params) || PyTuple_GET_SIZE(params) != NPARAMS) {
        PyErr_SetString(PyExc_ValueError, "params must be a tuple of 5 str or None");
        return -1;
    }
    for (int i = 0; i < NPARAMS; i++) {
        PyObject *v = PyTuple_GET_ITEM(params, i);
        if (v == Py_None)
            continue;
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (s == NULL)
            return -1;
        cmd->params[i] = malloc((size_t)n + 1);
        if (cmd->params[i] == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(cmd->params[i], s, (size_t)n + 1);
        cmd->param_len[i] = (size_t)n;
    }
    return 0;
}

static void *ssl_of(PyObject *obj) {
    if (!ossl_loaded || strcmp(Py_TYPE(obj)->tp_name, "_ssl._SSLSocket") != 0 ||
        Py_TYPE(obj)->tp_basicsize < (Py_ssize_t)sizeof(PySSLSocketHead))
        return NULL;
    void *ssl = ((PySSLSocketHead *)obj)->ssl;
    if (ssl == NULL || ossl.SSL_get_ex_data(ssl, 0) != (void *)obj)
        return NULL;
    return ssl;
}

static int set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0 ? -1 : 0;
}

static PyObject *Engine_add_pool(Engine *e, PyObject *args) {
    unsigned long long pool;
    int size;
    if (!PyArg_ParseTuple(args, "Ki", &pool, &size))
        return NULL;
    Command *cmd = new_command(e, CMD_ADD_POOL);
    if (cmd == NULL)
        return NULL;
    cmd->pool = pool;
    cmd->size = size;
    push_command(e, cmd);
    Py_RETURN_NONE;
}

static PyObject *Engine_resize(Engine *e, PyObject *args) {
    unsigned long long pool;
    int size;
    if (!PyArg_ParseTuple(args, "Ki", &pool, &size))
        return NULL;
    Command *cmd = new_command(e, CMD_RESIZE);
    if (cmd == NULL)
        return NULL;
    cmd->pool = pool;
    cmd->size = size;
    push_command(e, cmd);
    Py_RETURN_NONE;
}

static PyObject *Engine_simple(Engine *e, PyObject *args, int type, int with_token) {
    unsigned long long id, token = 0;
    if (with_token ? !PyArg_ParseTuple(args, "KK", &id, &token) : !PyArg_ParseTuple(args, "K", &id))
        return NULL;
    Command *cmd = new_command(e, type);
    if (cmd == NULL)
        return NULL;
    cmd->pool = cmd->id = id;
    cmd->token = token;
    push_command(e, cmd);
    Py_RETURN_NONE;
}

static PyObject *Engine_drop_pool(Engine *e, PyObject *args) {
    return Engine_simple(e, args, CMD_DROP_POOL, 0);
}

static PyObject *Engine_cancel(Engine *e, PyObject *args) {
    return Engine_simple(e, args, CMD_CANCEL, 1);
}

static PyObject *Engine_unhold(Engine *e, PyObject *args) {
    return Engine_simple(e, args, CMD_UNHOLD, 0);
}

static PyObject *Engine_pause(Engine *e, PyObject *args) {
    return Engine_simple(e, args, CMD_PAUSE, 1);
}

static PyObject *Engine_pause_force(Engine *e, PyObject *args) {
    return Engine_simple(e, args, CMD_PAUSE_FORCE, 1);
}

static PyObject *Engine_resume(Engine *e, PyObject *args) {
    return Engine_simple(e, args, CMD_RESUME, 0);
}

static PyObject *Engine_close_client(Engine *e, PyObject *args) {
    return Engine_simple(e, args, CMD_CLOSE_CLIENT, 0);
}

PyDoc_STRVAR(add_client_doc,
             "add_client(pool_id, client_id, fd, greeting, pending, params, tls=None)\n\n"
             "Take over a pooled client's socket (the engine closes it): send `greeting`, then process\n"
             "`pending` (bytes it sent after authenticating). `params`: its tracked values (5 str or None).\n"
             "`tls`: its `ssl.SSLObject._sslobj` (kept alive, untouched, by the caller until the client's end).");

static PyObject *Engine_add_client(Engine *e, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"pool_id", "client_id", "fd", "greeting", "pending", "params", "tls", NULL};
    unsigned long long pool, id;
    int fd;
    Py_buffer greeting, pending;
    PyObject *params, *tls = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKiy*y*O|O", kwlist, &pool, &id, &fd, &greeting, &pending, &params,
                                     &tls))
        return NULL;
    PyObject *result = NULL;
    void *ssl = NULL;
    if (tls != Py_None && (ssl = ssl_of(tls)) == NULL) {
        PyErr_SetString(PyExc_ValueError, "this TLS object cannot be driven natively");
        goto out;
    }
    if (set_nonblocking(fd) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    Command *cmd = new_command(e, CMD_ADD_CLIENT);
    if (cmd == NULL)
        goto out;
    cmd->pool = pool;
    cmd->id = id;
    cmd->ssl = ssl;
    if (copy_bytes(&greeting, &cmd->data, &cmd->data_len) < 0 ||
        copy_bytes(&pending, &cmd->pending, &cmd->pending_len) < 0 || copy_params(params, cmd) < 0) {
        free_command(cmd);
        goto out;
    }
    cmd->fd = fd; /* the engine's from here */
    pthread_mutex_lock(&e->lock);
    e->clients_open++;
    pthread_mutex_unlock(&e->lock);
    push_command(e, cmd);
    result = Py_None;
    Py_INCREF(result);
out:
    PyBuffer_Release(&greeting);
    PyBuffer_Release(&pending);
    return result;
}

static PyObject *Engine_add_server(Engine *e, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"pool_id", "server_id", "fd", "pending", "params", "requested", NULL};
    unsigned long long pool, id;
    int fd, requested;
    Py_buffer pending;
    PyObject *params;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKiy*Op", kwlist, &pool, &id, &fd, &pending, &params, &requested))
        return NULL;
    PyObject *result = NULL;
    if (set_nonblocking(fd) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    Command *cmd = new_command(e, CMD_ADD_SERVER);
    if (cmd == NULL)
        goto out;
    cmd->pool = pool;
    cmd->id = id;
    cmd->requested = requested;
    if (copy_bytes(&pending, &cmd->pending, &cmd->pending_len) < 0 || copy_params(params, cmd) < 0) {
        free_command(cmd);
        goto out;
    }
    cmd->fd = fd;
    pthread_mutex_lock(&e->lock);
    e->servers_open++;
    pthread_mutex_unlock(&e->lock);
    push_command(e, cmd);
    result = Py_None;
    Py_INCREF(result);
out:
    PyBuffer_Release(&pending);
    return result;
}

static PyObject *Engine_failed(Engine *e, PyObject *args) {
    unsigned long long pool;
    PyObject *error;
    if (!PyArg_ParseTuple(args, "KO", &pool, &error))
        return NULL;
    Command *cmd = new_command(e, CMD_FAILED);
    if (cmd == NULL)
        return NULL;
    cmd->pool = pool;
    if (error != Py_None) {
        char *p;
        Py_ssize_t n;
        if (PyBytes_AsStringAndSize(error, &p, &n) < 0 || (cmd->data = malloc((size_t)n + 1)) == NULL) {
            free_command(cmd);
            return PyErr_Occurred() ? NULL : PyErr_NoMemory();
        }
        memcpy(cmd->data, p, (size_t)n);
        cmd->data_len = (size_t)n;
    }
    push_command(e, cmd);
    Py_RETURN_NONE;
}

static PyObject *Engine_limits(Engine *e, PyObject *args) {
    double wait_timeout, idle_timeout;
    int max_prepared;
    Py_ssize_t statement_budget = 0;
    if (!PyArg_ParseTuple(args, "ddi|n", &wait_timeout, &idle_timeout, &max_prepared, &statement_budget))
        return NULL;
    Command *cmd = new_command(e, CMD_LIMITS);
    if (cmd == NULL)
        return NULL;
    cmd->wait_timeout = wait_timeout;
    cmd->idle_timeout = idle_timeout;
    cmd->max_prepared = max_prepared;
    cmd->statement_budget = statement_budget;
    push_command(e, cmd);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(events_doc, "events() -> [(type, a, b, c, d), ...] since the last call (call when fileno() is readable).");

static PyObject *Engine_events(Engine *e, PyObject *Py_UNUSED(ignored)) {
    drain_fd(e->event_fd);
    pthread_mutex_lock(&e->lock);
    Event *events = e->events;
    size_t n = e->nevents;
    e->events = NULL;
    e->nevents = e->events_cap = 0;
    pthread_mutex_unlock(&e->lock);
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list != NULL) {
        for (size_t i = 0; i < n; i++) {
            PyObject *item = Py_BuildValue("(iKKKK)", events[i].type, (unsigned long long)events[i].a,
                                           (unsigned long long)events[i].b, (unsigned long long)events[i].c,
                                           (unsigned long long)events[i].d);
            if (item == NULL) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)i, item);
        }
    }
    free(events);
    return list;
}

PyDoc_STRVAR(stats_doc,
             "stats(pool_id) -> (cl_active, cl_waiting, cl_idle, sv_active, sv_idle, sv_used, sv_login, maxwait,\n"
             "size, paused, xact_count, query_count, wait_time, wait_count, last_activity), or None.");

static PyObject *Engine_stats(Engine *e, PyObject *args) {
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "K", &id))
        return NULL;
    pthread_mutex_lock(&e->lock);
    Pool *p = pool_find(e, id);
    if (p == NULL) {
        pthread_mutex_unlock(&e->lock);
        Py_RETURN_NONE;
    }
    /* the counters are the thread's; read racily, as figures for a view */
    int nactive = p->nactive, nwaiting = p->nwaiting, nclients = p->nclients;
    Client *head = p->wait_head;
    double since = head != NULL ? head->waiting_since : 0;
    PyObject *result = Py_BuildValue(
        "(iiiiiiidiiKKdKd)", nactive, nwaiting, nclients - nactive - nwaiting, nactive, p->nidle, p->nused,
        p->opening, head != NULL ? now_monotonic() - since : 0.0, p->size, p->paused,
        (unsigned long long)p->xact_count, (unsigned long long)p->query_count, p->wait_time,
        (unsigned long long)p->wait_count, p->last_activity);
    pthread_mutex_unlock(&e->lock);
    return result;
}

static PyObject *Engine_counts(Engine *e, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&e->lock);
    PyObject *result = Py_BuildValue("(KK)", (unsigned long long)e->clients_open, (unsigned long long)e->servers_open);
    pthread_mutex_unlock(&e->lock);
    return result;
}

static PyObject *Engine_fileno(Engine *e, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(e->event_fd);
}

static void stop_thread(Engine *e) {
    if (!e->running)
        return;
    pthread_mutex_lock(&e->lock);
    e->stop = 1;
    pthread_mutex_unlock(&e->lock);
    signal_fd(e->wake_fd);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(e->thread, NULL);
    Py_END_ALLOW_THREADS
    e->running = 0;
    /* the thread is gone: end every pool's connections (their sockets close) and drop what was asked */
    while (e->npools > 0) {
        for (size_t b = 0; b < e->npool_buckets; b++) {
            if (e->pools[b] != NULL) {
                drop_pool(e, e->pools[b]);
                break;
            }
        }
    }
    free_dead(e);
    Command *cmd = e->commands;
    while (cmd != NULL) {
        Command *next = cmd->next;
        if (cmd->fd >= 0)
            close(cmd->fd);
        free_command(cmd);
        cmd = next;
    }
    e->commands = e->commands_tail = NULL;
}

static PyObject *Engine_shutdown(Engine *e, PyObject *Py_UNUSED(ignored)) {
    stop_thread(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "", kwlist))
        return NULL;
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (e == NULL)
        return NULL;
    e->epfd = e->wake_fd = e->event_fd = -1;
    pthread_mutex_init(&e->lock, NULL);
    e->wait_timeout = 120.0;
    e->idle_timeout = 600.0;
    e->max_prepared = 1000;
    e->pool_statement_budget = POOL_STATEMENT_BUDGET;
    e->registry.owner = e;
    e->registry.uncharge = pool_uncharge;
    e->buf = malloc(READ_CHUNK);
    e->tlsbuf = malloc(READ_CHUNK);
    e->toks = malloc((MAX_TOKENS_PER_STATEMENT + 2) * sizeof *e->toks);
    e->words = malloc((MAX_TOKENS_PER_STATEMENT + 2) * sizeof *e->words);
    if (e->buf == NULL || e->tlsbuf == NULL || e->toks == NULL || e->words == NULL) {
        Py_DECREF(e);
        return PyErr_NoMemory();
    }
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->epfd < 0 || e->wake_fd < 0 || e->event_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE_TAG};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    int err = pthread_create(&e->thread, NULL, engine_main, e);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    pthread_setname_np(e->thread, "argon-pooler"); /* top -H, /proc/<pid>/task/<tid>/comm; best effort */
    e->running = 1;
    return (PyObject *)e;
}

static void Engine_dealloc(Engine *e) {
    stop_thread(e);
    if (e->epfd >= 0)
        close(e->epfd);
    if (e->wake_fd >= 0)
        close(e->wake_fd);
    if (e->event_fd >= 0)
        close(e->event_fd);
    free(e->buf);
    free(e->tlsbuf);
    free(e->toks);
    free(e->words);
    free(e->events);
    free(e->arm);
    free(e->pools);
    free(e->registry.buckets);
    free(e->strings.buckets);
    pthread_mutex_destroy(&e->lock);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyMethodDef Engine_methods[] = {
    {"add_pool", (PyCFunction)Engine_add_pool, METH_VARARGS, "add_pool(pool_id, size)"},
    {"resize", (PyCFunction)Engine_resize, METH_VARARGS, "resize(pool_id, size)"},
    {"drop_pool", (PyCFunction)Engine_drop_pool, METH_VARARGS, "drop_pool(pool_id): close its clients and servers"},
    {"add_client", (PyCFunction)(void (*)(void))Engine_add_client, METH_VARARGS | METH_KEYWORDS, add_client_doc},
    {"add_server", (PyCFunction)(void (*)(void))Engine_add_server, METH_VARARGS | METH_KEYWORDS,
     "add_server(pool_id, server_id, fd, pending, params, requested): a logged-in server joins the pool"},
    {"failed", (PyCFunction)Engine_failed, METH_VARARGS,
     "failed(pool_id, error): an asked-for server could not be opened (error: an ErrorResponse or None)"},
    {"cancel", (PyCFunction)Engine_cancel, METH_VARARGS,
     "cancel(client_id, token): hold the server the client uses; answered by an EV_CANCEL event"},
    {"unhold", (PyCFunction)Engine_unhold, METH_VARARGS, "unhold(server_id): the cancel was delivered"},
    {"pause", (PyCFunction)Engine_pause, METH_VARARGS, "pause(pool_id, token): quiesce; answered by EV_PAUSED"},
    {"pause_force", (PyCFunction)Engine_pause_force, METH_VARARGS,
     "pause_force(pool_id, token): quiesce even if a server is in use (the stop happens anyway)"},
    {"resume", (PyCFunction)Engine_resume, METH_VARARGS, "resume(pool_id)"},
    {"close_client", (PyCFunction)Engine_close_client, METH_VARARGS, "close_client(client_id)"},
    {"limits", (PyCFunction)Engine_limits, METH_VARARGS, "limits(wait_timeout, idle_timeout, max_prepared[, statement_budget per pool])"},
    {"events", (PyCFunction)Engine_events, METH_NOARGS, events_doc},
    {"stats", (PyCFunction)Engine_stats, METH_VARARGS, stats_doc},
    {"counts", (PyCFunction)Engine_counts, METH_NOARGS, "counts() -> (clients, servers) open or being added"},
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The eventfd that is readable when there are events."},
    {"shutdown", (PyCFunction)Engine_shutdown, METH_NOARGS, "Stop the thread and close every connection."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "argon.proxy._pooler.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The transaction pooler's engine: one epoll thread holding pooled clients and servers.",
    .tp_methods = Engine_methods,
    .tp_new = Engine_new,
};

static PyObject *load_openssl(PyObject *Py_UNUSED(module), PyObject *arg) {
    const char *path = PyUnicode_AsUTF8(arg);
    if (path == NULL)
        return NULL;
    if (ossl_loaded)
        Py_RETURN_TRUE;
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL)
        Py_RETURN_FALSE;
    OpenSSL o;
#define SYM(name) (*(void **)&o.name = dlsym(h, #name)) != NULL
    int ok = SYM(SSL_read) && SYM(SSL_write) && SYM(SSL_get_error) && SYM(SSL_get_rbio) && SYM(SSL_get_wbio) &&
             SYM(SSL_get_ex_data) && SYM(SSL_shutdown) && SYM(BIO_write) && SYM(BIO_read) && SYM(BIO_ctrl) &&
             SYM(ERR_clear_error) && SYM(SSL_ctrl) && SYM(SSL_has_pending);
#undef SYM
    if (!ok)
        Py_RETURN_FALSE;
    ossl = o;
    ossl_loaded = 1;
    Py_RETURN_TRUE;
}

static PyObject *tls_usable(PyObject *Py_UNUSED(module), PyObject *obj) {
    return PyBool_FromLong(ssl_of(obj) != NULL);
}

static PyObject *py_changes_session(PyObject *Py_UNUSED(module), PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int r = changes_session(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyBool_FromLong(r);
}

static PyMethodDef module_methods[] = {
    {"load_openssl", load_openssl, METH_O, "load_openssl(path) -> bool: OpenSSL through Python's _ssl (see _relay)."},
    {"tls_usable", tls_usable, METH_O, "tls_usable(obj) -> bool: whether an ssl.SSLObject._sslobj can be driven here."},
    {"changes_session", py_changes_session, METH_O, "changes_session(sql: bytes) -> bool (sql_scan's C port)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pooler_module = {
    PyModuleDef_HEAD_INIT, "_pooler", "The transaction pooler's engine, on its own epoll thread.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__pooler(void) {
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&pooler_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "EV_WANT", EV_WANT);
    PyModule_AddIntConstant(m, "EV_CLIENT_END", EV_CLIENT_END);
    PyModule_AddIntConstant(m, "EV_SERVER_END", EV_SERVER_END);
    PyModule_AddIntConstant(m, "EV_CANCEL", EV_CANCEL);
    PyModule_AddIntConstant(m, "EV_PAUSED", EV_PAUSED);
    return m;
}
