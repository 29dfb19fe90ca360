/*
 * The proxy's relay after login, in C: one epoll thread moves bytes between client and compute
 * sockets without the interpreter.
 *
 * Why: in Python the relay costs one interpreter round per message, which is most of the proxy's
 * CPU under pgbench (see docs/adr/0012-native-relay.md). Here a message costs what it costs in
 * PgBouncer: epoll_wait, recv, send. The thread never touches Python objects and never holds the
 * GIL; Python talks to it through a mutex-protected request queue and two eventfds.
 *
 * What it keeps from the Python relay (argon/proxy/pipe.py), so the suspend policy sees the same
 * thing: message framing in both directions. Client -> compute, a query-ish message (Q P B E F S D
 * C H d) marks the session busy; compute -> client, ReadyForQuery ends the query and its status
 * byte says whether a transaction is open. Each read stamps the last activity (CLOCK_MONOTONIC,
 * the clock of Python's time.monotonic()).
 *
 * Backpressure: a write that does not complete keeps the rest in a per-side buffer, stops reading
 * the side it came from and waits for EPOLLOUT; reading resumes once the buffer is flushed. A TLS
 * client's own reads make output for it too (KeyUpdate answers, alerts): it is not read while more
 * than TLS_OUT_CAP waits for it, or a client that sends and never reads would grow the buffer
 * without bound. End of
 * a session: EOF or an error on either side; what is still buffered for the other side is written
 * first (the compute's last FATAL reaches the client), then both sockets are closed and the session
 * is reported on the "done" eventfd with its byte counts.
 *
 * TLS: a client session that Python's ssl module negotiated (uvloop: an ssl.SSLObject over memory
 * BIOs) moves here too. Its OpenSSL `SSL *` is taken from the `_ssl._SSLSocket` object (checked by
 * type, and by the back pointer `_ssl` stores as the SSL's app data) and driven through those same
 * memory BIOs with the OpenSSL that `_ssl` is linked to (found with dlopen/dlsym on `_ssl`'s own
 * file, never a second copy). Python keeps the object alive and does not touch it until the
 * session is reaped. Ciphertext from the socket goes into the read BIO, SSL_read gives plaintext
 * for the compute; the compute's bytes go through SSL_write and the write BIO to the socket.
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
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_CHUNK (256 * 1024)
#ifndef TLS_OUT_CAP
#define TLS_OUT_CAP (64 * 1024) /* a TLS client is not read while more than this waits for it */
#endif
#define MAX_EVENTS 256
#define CLIENT 0
#define COMPUTE 1
#define WAKE_TAG ((uint64_t)1)

typedef struct {
    uint32_t remaining; /* body bytes of the current message still to come */
    uint8_t hdr[5];     /* a message header split across reads */
    uint8_t hdr_len;
    uint8_t want_status; /* the next body byte is ReadyForQuery's transaction status */
} Framing;

typedef struct {
    int fd;
    int readable;   /* no EOF or error seen on this fd yet */
    int registered; /* in the epoll set */
    uint32_t mask;  /* the events it is registered for */
    char *out;      /* bytes read from the other side, not yet written to this fd */
    size_t out_len, out_off;
    Framing framing; /* of the bytes read from this fd */
    uint64_t bytes;  /* read from this fd */
} Side;

/* OpenSSL, as linked into Python's _ssl module (load_openssl) */
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
} OpenSSL;

static OpenSSL ossl;
static int ossl_loaded;

#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_ZERO_RETURN 6
#define BIO_CTRL_PENDING 10

/* CPython's PySSLSocket (Modules/_ssl.c, unchanged from 3.7 to 3.14): the SSL pointer follows the
   weak reference to the socket. */
typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    void *ssl;
} PySSLSocketHead;

typedef struct Session {
    uint64_t id;
    Side side[2];
    void *ssl;         /* the client side is TLS: its OpenSSL object (owned by Python) */
    char *tls_greeting; /* plaintext for the client, encrypted by the thread when it registers */
    size_t tls_greeting_len;
    int in_query;       /* written by the relay thread, read under the mutex */
    int in_transaction;
    double last_activity; /* written by the relay thread, read under the mutex: atomic */
    int draining;       /* one side ended: flush what is buffered for the other, then close */
    int dead;           /* ended; freed at the end of the current event batch */
    struct Session *next; /* in the add list or the dead list */
} Session;

typedef struct {
    uint64_t id, bytes_client, bytes_compute;
} Done;

typedef struct {
    PyObject_HEAD
    int epfd, wake_fd, done_fd;
    pthread_t thread;
    int running;
    char *buf;    /* the thread's read buffer */
    char *tlsbuf; /* the thread's second buffer: plaintext out of SSL_read, ciphertext out of the BIO */
    uint64_t *closing; /* the thread's copy of `closes`, swapped with it under the lock */
    size_t closing_cap;
    size_t buffered; /* bytes waiting in every session's out buffers (atomic; for stats()) */
    uint64_t relayed[2]; /* bytes read from clients [CLIENT] and computes [COMPUTE], all sessions (atomic) */
    pthread_mutex_t lock;
    /* protected by lock */
    Session **table; /* open sessions by slot; id = generation << 24 | slot */
    uint32_t *generation;
    size_t table_size;
    size_t live;     /* sessions in the table */
    Session *adds;   /* handed over by Python, not yet registered */
    uint64_t *closes; /* ids Python asked to end */
    size_t closes_len, closes_cap;
    Done *done;      /* done_cap >= done_len + live: an ending session always has room for its record */
    size_t done_len, done_cap;
    int stop;
} RelayObject;

static double now_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void signal_fd(int fd) {
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(fd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
}

/* Room for one more item in a growable array (callers hold the lock): 0, or -1 out of memory. */
static int reserve(void **items, size_t *cap, size_t len, size_t size, size_t first) {
    if (len < *cap)
        return 0;
    size_t n = *cap ? *cap * 2 : first;
    void *grown = realloc(*items, n * size);
    if (grown == NULL)
        return -1;
    *items = grown;
    *cap = n;
    return 0;
}

static void drain_fd(int fd) {
    uint64_t v;
    while (read(fd, &v, sizeof v) > 0) {
    }
}

/* ---- framing ------------------------------------------------------------------------------- */

static const char QUERY_TAGS[] = "QPBEFSDCHd";

static void scan(Session *s, int from, const uint8_t *p, size_t n) {
    Framing *f = &s->side[from].framing;
    size_t i = 0;
    while (i < n) {
        if (f->remaining > 0) {
            if (f->want_status) {
                __atomic_store_n(&s->in_transaction, p[i] != 'I', __ATOMIC_RELAXED);
                f->want_status = 0;
            }
            size_t take = n - i < f->remaining ? n - i : f->remaining;
            i += take;
            f->remaining -= (uint32_t)take;
            continue;
        }
        f->hdr[f->hdr_len++] = p[i++];
        if (f->hdr_len < 5)
            continue;
        f->hdr_len = 0;
        uint8_t tag = f->hdr[0];
        uint32_t len = ((uint32_t)f->hdr[1] << 24) | ((uint32_t)f->hdr[2] << 16) | ((uint32_t)f->hdr[3] << 8) |
                       (uint32_t)f->hdr[4];
        f->remaining = len < 4 ? 0 : len - 4;
        if (from == CLIENT) {
            if (tag != 0 && strchr(QUERY_TAGS, tag) != NULL)
                __atomic_store_n(&s->in_query, 1, __ATOMIC_RELAXED);
        } else if (tag == 'Z') {
            __atomic_store_n(&s->in_query, 0, __ATOMIC_RELAXED);
            f->want_status = f->remaining > 0;
        }
    }
}

/* ---- the relay thread ---------------------------------------------------------------------- */

/* The open session with this id, or NULL once it ended. Call with the lock held. */
static Session *lookup(RelayObject *r, uint64_t id) {
    size_t slot = (size_t)(id & 0xffffff);
    if (slot >= r->table_size)
        return NULL;
    Session *s = r->table[slot];
    return s != NULL && s->id == id ? s : NULL;
}


/* Whether side k may be read now. Not while the other side has bytes waiting (what we read would
   pile up behind them), and not a TLS client with more than TLS_OUT_CAP waiting for it: reading it
   can make output for it too (a KeyUpdate answer), so a client that never reads could grow that
   buffer without bound. */
static int may_read(const Session *s, int k) {
    const Side *side = &s->side[k];
    if (!side->readable || s->draining || s->side[1 - k].out_len > 0)
        return 0;
    return !(k == CLIENT && s->ssl != NULL && side->out_len - side->out_off > TLS_OUT_CAP);
}

static void set_mask(RelayObject *r, Session *s, int k) {
    Side *side = &s->side[k];
    uint32_t mask = 0;
    if (may_read(s, k))
        mask |= EPOLLIN;
    if (side->out_len > 0)
        mask |= EPOLLOUT;
    if (mask == side->mask && (mask != 0) == side->registered)
        return;
    struct epoll_event ev = {.events = mask, .data.u64 = (uint64_t)(uintptr_t)s | (uint64_t)k};
    if (mask == 0) {
        if (side->registered)
            epoll_ctl(r->epfd, EPOLL_CTL_DEL, side->fd, NULL);
        side->registered = 0;
    } else if (side->registered) {
        epoll_ctl(r->epfd, EPOLL_CTL_MOD, side->fd, &ev);
    } else {
        epoll_ctl(r->epfd, EPOLL_CTL_ADD, side->fd, &ev);
        side->registered = 1;
    }
    side->mask = mask;
}

/* Bytes that entered (+) or left (-) the out buffers, for stats(). */
static void account(RelayObject *r, size_t added, size_t removed) {
    if (added)
        __atomic_add_fetch(&r->buffered, added, __ATOMIC_RELAXED);
    if (removed)
        __atomic_sub_fetch(&r->buffered, removed, __ATOMIC_RELAXED);
}

/* Closing a socket with unread input makes the kernel send a reset, and a reset can make the peer
   drop what it had not read yet: the compute's last error would never reach a client whose next
   query was already on its way. Read and drop what is waiting (bounded), then close sends a FIN. */
static void discard_input(int fd) {
    char sink[16384];
    for (int i = 0; i < 64; i++) {
        ssize_t n = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
        if (n <= 0 && !(n < 0 && errno == EINTR))
            break;
    }
}

/* The session ends: sockets closed, its record queued for reap(). `s` itself is freed by the caller
   at the end of the event batch (later events of the batch may still name it; they see `dead`). */
static void end_session(RelayObject *r, Session *s, Session **dead) {
    if (s->dead)
        return;
    s->dead = 1;
    if (s->ssl != NULL && s->side[CLIENT].readable && s->side[CLIENT].out_len == 0) {
        /* the compute ended the session: say so in TLS too (best effort, never blocks) */
        ossl.ERR_clear_error();
        ossl.SSL_shutdown(s->ssl);
        ossl.ERR_clear_error();
        void *wbio = ossl.SSL_get_wbio(s->ssl);
        int n = ossl.BIO_read(wbio, r->tlsbuf, READ_CHUNK);
        if (n > 0)
            (void)!send(s->side[CLIENT].fd, r->tlsbuf, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    free(s->tls_greeting);
    s->tls_greeting = NULL;
    for (int k = 0; k < 2; k++) {
        Side *side = &s->side[k];
        if (side->registered)
            epoll_ctl(r->epfd, EPOLL_CTL_DEL, side->fd, NULL);
        side->registered = 0;
        discard_input(side->fd);
        close(side->fd);
        account(r, 0, side->out_len - side->out_off);
        free(side->out);
        side->out = NULL;
        side->out_len = side->out_off = 0;
    }
    pthread_mutex_lock(&r->lock);
    size_t slot = (size_t)(s->id & 0xffffff);
    if (slot < r->table_size && r->table[slot] == s) {
        r->table[slot] = NULL;
        r->live--;
    }
    /* room reserved by add(): the record of an ending session is never lost */
    if (r->done_len < r->done_cap)
        r->done[r->done_len++] = (Done){s->id, s->side[CLIENT].bytes, s->side[COMPUTE].bytes};
    pthread_mutex_unlock(&r->lock);
    signal_fd(r->done_fd);
    s->next = *dead;
    *dead = s;
}

/* Write what is buffered for side k. Returns 0 when done or blocked, -1 on a write error. */
static int flush(RelayObject *r, Session *s, int k) {
    Side *side = &s->side[k];
    while (side->out_off < side->out_len) {
        ssize_t w = send(side->fd, side->out + side->out_off, side->out_len - side->out_off, MSG_NOSIGNAL);
        if (w > 0) {
            side->out_off += (size_t)w;
            account(r, 0, (size_t)w);
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            return -1;
        }
    }
    free(side->out);
    side->out = NULL;
    side->out_len = side->out_off = 0;
    return 0;
}

/* Send `n` bytes to side k, buffering what the socket does not take now. -1 on a write error.
   Appends when side k is already blocked: initial data, and a TLS client's records (bounded by
   may_read: one read's worth beyond TLS_OUT_CAP). */
static int deliver(RelayObject *r, Session *s, int k, const char *p, size_t n) {
    Side *side = &s->side[k];
    if (side->out_len > 0) {
        char *grown = realloc(side->out, side->out_len + n);
        if (grown == NULL)
            return -1;
        memcpy(grown + side->out_len, p, n);
        side->out = grown;
        side->out_len += n;
        account(r, n, 0);
        return 0;
    }
    size_t done = 0;
    while (done < n) {
        ssize_t w = send(side->fd, p + done, n - done, MSG_NOSIGNAL);
        if (w > 0) {
            done += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            return -1;
        }
    }
    if (done < n) {
        side->out = malloc(n - done);
        if (side->out == NULL)
            return -1;
        memcpy(side->out, p + done, n - done);
        side->out_len = n - done;
        side->out_off = 0;
        account(r, n - done, 0);
    }
    return 0;
}

/* Move what OpenSSL wrote into the write BIO to the client socket. */
static int tls_flush(RelayObject *r, Session *s) {
    void *wbio = ossl.SSL_get_wbio(s->ssl);
    for (;;) {
        long pending = ossl.BIO_ctrl(wbio, BIO_CTRL_PENDING, 0, NULL);
        if (pending <= 0)
            return 0;
        int n = ossl.BIO_read(wbio, r->tlsbuf, pending < READ_CHUNK ? (int)pending : READ_CHUNK);
        if (n <= 0)
            return 0;
        if (deliver(r, s, CLIENT, r->tlsbuf, (size_t)n) < 0)
            return -1;
    }
}

/* Plaintext for the client: encrypt, then send the records. */
static int tls_send(RelayObject *r, Session *s, const char *p, size_t n) {
    while (n > 0) {
        int chunk = n < (size_t)READ_CHUNK ? (int)n : READ_CHUNK;
        ossl.ERR_clear_error(); /* the thread's error queue is shared by every session it relays */
        int w = ossl.SSL_write(s->ssl, p, chunk);
        if (w <= 0)
            return -1; /* memory BIOs never want more: this is a real error */
        if (tls_flush(r, s) < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Decrypt what the read BIO holds and pass the plaintext to the compute. 1 at close_notify. */
static int tls_receive(RelayObject *r, Session *s) {
    for (;;) {
        /* SSL_get_error reads the thread's error queue, which every session on this thread shares:
           one session's failure must not make the next one's WANT_READ look fatal */
        ossl.ERR_clear_error();
        int n = ossl.SSL_read(s->ssl, r->tlsbuf, READ_CHUNK);
        if (n > 0) {
            s->side[CLIENT].bytes += (uint64_t)n;
            __atomic_fetch_add(&r->relayed[CLIENT], (uint64_t)n, __ATOMIC_RELAXED);
            scan(s, CLIENT, (const uint8_t *)r->tlsbuf, (size_t)n);
            if (deliver(r, s, COMPUTE, r->tlsbuf, (size_t)n) < 0)
                return -1;
            continue;
        }
        int err = ossl.SSL_get_error(s->ssl, n);
        int rc = err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE ? 0 : err == SSL_ERROR_ZERO_RETURN ? 1 : -1;
        if (tls_flush(r, s) < 0) /* a KeyUpdate answer, an alert */
            return -1;
        return rc;
    }
}

static void on_event(RelayObject *r, Session *s, int k, uint32_t events, Session **dead) {
    Side *side = &s->side[k];
    int hangup = (events & (EPOLLHUP | EPOLLERR)) != 0;
    if ((events & EPOLLOUT) || (hangup && side->out_len > 0)) {
        if (flush(r, s, k) < 0) {
            end_session(r, s, dead);
            return;
        }
    }
    if ((events & EPOLLIN || hangup) && may_read(s, k)) {
        char *buf = r->buf;
        ssize_t n;
        do {
            n = recv(side->fd, buf, READ_CHUNK, 0);
        } while (n < 0 && errno == EINTR);
        if (n > 0) {
            __atomic_store(&s->last_activity, &(double){now_monotonic()}, __ATOMIC_RELAXED);
            int rc;
            if (s->ssl != NULL && k == CLIENT) {
                rc = ossl.BIO_write(ossl.SSL_get_rbio(s->ssl), buf, (int)n) == (int)n ? tls_receive(r, s) : -1;
                if (rc == 1) { /* close_notify: the client is done */
                    side->readable = 0;
                    s->draining = 1;
                    rc = 0;
                }
            } else {
                side->bytes += (uint64_t)n;
                __atomic_fetch_add(&r->relayed[k], (uint64_t)n, __ATOMIC_RELAXED);
                scan(s, k, (const uint8_t *)buf, (size_t)n);
                rc = s->ssl != NULL ? tls_send(r, s, buf, (size_t)n) : deliver(r, s, 1 - k, buf, (size_t)n);
            }
            if (rc < 0) {
                end_session(r, s, dead);
                return;
            }
        } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
            side->readable = 0;
            s->draining = 1;
        }
    }
    /* a side that sent EOF gets nothing more: the compute's last words still reach a client that
       is listening, a client's Terminate still reaches the compute */
    if (s->draining && (s->side[CLIENT].out_len == 0 || !s->side[CLIENT].readable) &&
        (s->side[COMPUTE].out_len == 0 || !s->side[COMPUTE].readable)) {
        end_session(r, s, dead);
        return;
    }
    if (s->draining && hangup && side->out_len > 0) {
        end_session(r, s, dead); /* nothing more can be written to a side that hung up */
        return;
    }
    set_mask(r, s, 0);
    set_mask(r, s, 1);
}

static void register_session(RelayObject *r, Session *s, Session **dead) {
    if (s->ssl != NULL) {
        /* records Python left in the BIOs, then the greeting; plaintext already inside SSL */
        int rc = tls_flush(r, s);
        if (rc == 0 && s->tls_greeting_len > 0)
            rc = tls_send(r, s, s->tls_greeting, s->tls_greeting_len);
        free(s->tls_greeting);
        s->tls_greeting = NULL;
        s->tls_greeting_len = 0;
        if (rc == 0)
            rc = tls_receive(r, s);
        if (rc == 1) {
            s->side[CLIENT].readable = 0;
            s->draining = 1;
        } else if (rc < 0) {
            end_session(r, s, dead);
            return;
        }
    }
    /* the initial bytes were queued by Python in side[k].out; try to send them now */
    for (int k = 0; k < 2; k++) {
        if (s->side[k].out_len > 0 && flush(r, s, k) < 0) {
            end_session(r, s, dead);
            return;
        }
    }
    set_mask(r, s, 0);
    set_mask(r, s, 1);
}

/* The wake eventfd fired: register what Python added, end what it asked to close. Both lists are
   taken in one critical section. A close always follows its session's add, so every id taken
   here names a session that was registered before or is in this batch of adds. Taking the closes
   later would let a close name a session whose add came in after the adds were taken: it would be
   ended (and freed) while still on the add list. */
static int on_wake(RelayObject *r, Session **dead) {
    drain_fd(r->wake_fd);
    pthread_mutex_lock(&r->lock);
    Session *adds = r->adds;
    r->adds = NULL;
    uint64_t *closes = r->closes;
    size_t n_closes = r->closes_len, cap = r->closes_cap;
    r->closes = r->closing; /* the spare array, empty */
    r->closes_cap = r->closing_cap;
    r->closes_len = 0;
    int stop = r->stop;
    pthread_mutex_unlock(&r->lock);
    r->closing = closes;
    r->closing_cap = cap;
    /* the list was built by prepending: registration order does not matter */
    while (adds != NULL) {
        Session *s = adds;
        adds = s->next;
        s->next = NULL;
        register_session(r, s, dead);
    }
    for (size_t i = 0; i < n_closes; i++) {
        pthread_mutex_lock(&r->lock);
        Session *s = lookup(r, closes[i]); /* NULL once it ended, even if its slot was reused */
        pthread_mutex_unlock(&r->lock);
        if (s != NULL)
            end_session(r, s, dead);
    }
    return stop;
}

static void *relay_main(void *arg) {
    RelayObject *r = (RelayObject *)arg;
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(r->epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        Session *dead = NULL;
        int stop = 0;
        for (int i = 0; i < n; i++) {
            uint64_t tag = events[i].data.u64;
            if (tag == WAKE_TAG) {
                stop |= on_wake(r, &dead);
                continue;
            }
            Session *s = (Session *)(uintptr_t)(tag & ~(uint64_t)1);
            if (!s->dead)
                on_event(r, s, (int)(tag & 1), events[i].events, &dead);
        }
        while (dead != NULL) {
            Session *s = dead;
            dead = s->next;
            free(s);
        }
        if (stop)
            break;
    }
    return NULL;
}


/* ---- the Python side ----------------------------------------------------------------------- */

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "", kwlist))
        return NULL;
    RelayObject *r = (RelayObject *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    r->epfd = r->wake_fd = r->done_fd = -1;
    pthread_mutex_init(&r->lock, NULL);
    r->buf = malloc(READ_CHUNK);
    r->tlsbuf = malloc(READ_CHUNK);
    if (r->buf == NULL || r->tlsbuf == NULL) {
        Py_DECREF(r);
        return PyErr_NoMemory();
    }
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->done_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->epfd < 0 || r->wake_fd < 0 || r->done_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE_TAG};
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    int err = pthread_create(&r->thread, NULL, relay_main, r);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    pthread_setname_np(r->thread, "argon-relay"); /* top -H, /proc/<pid>/task/<tid>/comm; best effort */
    r->running = 1;
    return (PyObject *)r;
}

static void stop_thread(RelayObject *r) {
    if (!r->running)
        return;
    pthread_mutex_lock(&r->lock);
    r->stop = 1;
    pthread_mutex_unlock(&r->lock);
    signal_fd(r->wake_fd);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(r->thread, NULL);
    Py_END_ALLOW_THREADS
    r->running = 0;
    /* the thread is gone: close what is left */
    for (size_t i = 0; i < r->table_size; i++) {
        Session *s = r->table[i];
        if (s == NULL)
            continue;
        for (int k = 0; k < 2; k++) {
            close(s->side[k].fd);
            account(r, 0, s->side[k].out_len - s->side[k].out_off);
            free(s->side[k].out);
        }
        free(s->tls_greeting);
        free(s);
        r->table[i] = NULL;
    }
    r->live = 0;
    r->adds = NULL; /* its sessions are in the table */
    r->closes_len = 0;
}

static void Relay_dealloc(RelayObject *r) {
    stop_thread(r);
    if (r->epfd >= 0)
        close(r->epfd);
    if (r->wake_fd >= 0)
        close(r->wake_fd);
    if (r->done_fd >= 0)
        close(r->done_fd);
    free(r->buf);
    free(r->tlsbuf);
    free(r->table);
    free(r->generation);
    free(r->done);
    free(r->closes);
    free(r->closing);
    pthread_mutex_destroy(&r->lock);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* The SSL * of a `_ssl._SSLSocket`, or NULL (no exception) when it cannot be used here. */
static void *ssl_of(PyObject *obj) {
    if (!ossl_loaded || strcmp(Py_TYPE(obj)->tp_name, "_ssl._SSLSocket") != 0 ||
        Py_TYPE(obj)->tp_basicsize < (Py_ssize_t)sizeof(PySSLSocketHead))
        return NULL;
    void *ssl = ((PySSLSocketHead *)obj)->ssl;
    if (ssl == NULL || ossl.SSL_get_ex_data(ssl, 0) != (void *)obj) /* _ssl's SSL_set_app_data(ssl, self) */
        return NULL;
    return ssl;
}

PyDoc_STRVAR(add_doc,
             "add(client_fd, compute_fd, to_compute, to_client, tls=None) -> id\n\n"
             "Take over two connected sockets (the relay closes them) and relay between them.\n"
             "`to_compute` / `to_client`: plaintext already read from the other side, sent first.\n"
             "`tls`: the client's `ssl.SSLObject._sslobj` when the client side is TLS over memory BIOs;\n"
             "the caller keeps it alive, and untouched, until the session is reaped.\n"
             "ValueError when `tls` cannot be driven from here (check first with tls_usable()).");

static PyObject *Relay_add(RelayObject *r, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"client_fd", "compute_fd", "to_compute", "to_client", "tls", NULL};
    int fds[2];
    Py_buffer to_compute, to_client;
    PyObject *tls = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiy*y*|O", kwlist, &fds[CLIENT], &fds[COMPUTE], &to_compute,
                                     &to_client, &tls))
        return NULL;
    PyObject *result = NULL;
    Session *s = NULL;
    void *ssl = NULL;
    if (!r->running) {
        PyErr_SetString(PyExc_RuntimeError, "the relay is closed");
        goto out;
    }
    if (tls != Py_None && (ssl = ssl_of(tls)) == NULL) {
        PyErr_SetString(PyExc_ValueError, "this TLS object cannot be relayed natively");
        goto out;
    }
    for (int k = 0; k < 2; k++) {
        int flags = fcntl(fds[k], F_GETFL);
        if (flags < 0 || fcntl(fds[k], F_SETFL, flags | O_NONBLOCK) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
    }
    s = calloc(1, sizeof *s);
    if (s == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    s->last_activity = now_monotonic();
    s->ssl = ssl;
    for (int k = 0; k < 2; k++) {
        s->side[k].fd = fds[k];
        s->side[k].readable = 1;
    }
    Py_buffer *initial[2] = {&to_client, &to_compute}; /* indexed by the side they are written to */
    for (int k = 0; k < 2; k++) {
        if (initial[k]->len == 0)
            continue;
        if (k == CLIENT && ssl != NULL) { /* encrypted by the thread */
            s->tls_greeting = malloc((size_t)initial[k]->len);
            if (s->tls_greeting == NULL) {
                free(s);
                s = NULL;
                PyErr_NoMemory();
                goto out;
            }
            memcpy(s->tls_greeting, initial[k]->buf, (size_t)initial[k]->len);
            s->tls_greeting_len = (size_t)initial[k]->len;
            scan(s, COMPUTE, (const uint8_t *)initial[k]->buf, (size_t)initial[k]->len);
            continue;
        }
        s->side[k].out = malloc((size_t)initial[k]->len);
        if (s->side[k].out == NULL) {
            free(s->side[1 - k].out);
            free(s->tls_greeting);
            free(s);
            s = NULL;
            PyErr_NoMemory();
            goto out;
        }
        memcpy(s->side[k].out, initial[k]->buf, (size_t)initial[k]->len);
        s->side[k].out_len = (size_t)initial[k]->len;
        scan(s, 1 - k, (const uint8_t *)initial[k]->buf, (size_t)initial[k]->len);
    }
    pthread_mutex_lock(&r->lock);
    /* room for this session's record when it ends (end_session cannot fail for want of memory) */
    size_t need = r->done_len + r->live + 1;
    if (need > r->done_cap) {
        size_t cap = need < 64 ? 64 : need * 2;
        Done *grown = realloc(r->done, cap * sizeof *grown);
        if (grown == NULL) {
            pthread_mutex_unlock(&r->lock);
            for (int k = 0; k < 2; k++)
                free(s->side[k].out);
            free(s->tls_greeting);
            free(s);
            s = NULL;
            PyErr_NoMemory();
            goto out;
        }
        r->done = grown;
        r->done_cap = cap;
    }
    size_t slot = 0;
    while (slot < r->table_size && r->table[slot] != NULL)
        slot++;
    if (slot == r->table_size) {
        size_t size = r->table_size ? r->table_size * 2 : 64;
        Session **table = size <= 0x1000000 ? realloc(r->table, size * sizeof *table) : NULL;
        uint32_t *gen = table != NULL ? realloc(r->generation, size * sizeof *gen) : NULL;
        if (table != NULL)
            r->table = table;
        if (gen == NULL) {
            pthread_mutex_unlock(&r->lock);
            for (int k = 0; k < 2; k++)
                free(s->side[k].out);
            free(s->tls_greeting);
            free(s);
            s = NULL;
            PyErr_NoMemory();
            goto out;
        }
        r->generation = gen;
        for (size_t i = r->table_size; i < size; i++) {
            r->table[i] = NULL;
            r->generation[i] = 0;
        }
        r->table_size = size;
    }
    r->generation[slot]++;
    /* the id is copied here, under the lock: once the lock is released the relay thread owns `s`
       and may end and free it before this thread runs again */
    uint64_t id = ((uint64_t)r->generation[slot] << 24) | slot;
    s->id = id;
    r->table[slot] = s;
    r->live++;
    account(r, s->side[CLIENT].out_len + s->side[COMPUTE].out_len, 0);
    s->next = r->adds;
    r->adds = s;
    s = NULL; /* handed over */
    pthread_mutex_unlock(&r->lock);
    signal_fd(r->wake_fd);
    result = PyLong_FromUnsignedLongLong(id);
out:
    PyBuffer_Release(&to_compute);
    PyBuffer_Release(&to_client);
    return result;
}

PyDoc_STRVAR(close_doc, "close(id): end a session now (what is buffered is dropped). No-op once it ended.");

static PyObject *Relay_close(RelayObject *r, PyObject *arg) {
    uint64_t id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    int queued = 0, failed = 0;
    pthread_mutex_lock(&r->lock);
    if (lookup(r, id) != NULL) {
        failed = reserve((void **)&r->closes, &r->closes_cap, r->closes_len, sizeof *r->closes, 16) < 0;
        if (!failed) {
            r->closes[r->closes_len++] = id;
            queued = 1;
        }
    }
    pthread_mutex_unlock(&r->lock);
    if (failed)
        return PyErr_NoMemory();
    if (queued)
        signal_fd(r->wake_fd);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(state_doc,
             "state(id) -> (in_query, in_transaction, last_activity) or None once the session ended.\n"
             "last_activity is on time.monotonic()'s clock.");

static PyObject *Relay_state(RelayObject *r, PyObject *arg) {
    uint64_t id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&r->lock);
    Session *s = lookup(r, id);
    int in_query = 0, in_transaction = 0;
    double last = 0;
    if (s != NULL) {
        in_query = __atomic_load_n(&s->in_query, __ATOMIC_RELAXED);
        in_transaction = __atomic_load_n(&s->in_transaction, __ATOMIC_RELAXED);
        __atomic_load(&s->last_activity, &last, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&r->lock);
    if (s == NULL)
        Py_RETURN_NONE;
    return Py_BuildValue("(OOd)", in_query ? Py_True : Py_False, in_transaction ? Py_True : Py_False, last);
}

PyDoc_STRVAR(reap_doc,
             "reap() -> [(id, bytes_from_client, bytes_from_compute), ...]: the sessions that ended since\n"
             "the last call. Call it when fileno() is readable.");

static PyObject *Relay_reap(RelayObject *r, PyObject *Py_UNUSED(ignored)) {
    drain_fd(r->done_fd);
    /* copied out, not taken: the array's capacity is what add() reserved for sessions still open.
       No Python call while the lock is held (a finalizer could call close() and wait on it). */
    pthread_mutex_lock(&r->lock);
    size_t n = r->done_len;
    pthread_mutex_unlock(&r->lock);
    Done *done = malloc((n ? n : 1) * sizeof *done);
    if (done == NULL)
        return PyErr_NoMemory();
    if (n > 0) { /* records only grow at the end until reaped */
        pthread_mutex_lock(&r->lock);
        memcpy(done, r->done, n * sizeof *done);
        memmove(r->done, r->done + n, (r->done_len - n) * sizeof *done);
        r->done_len -= n;
        pthread_mutex_unlock(&r->lock);
    }
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL) {
        free(done);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        PyObject *item = Py_BuildValue("(KKK)", (unsigned long long)done[i].id,
                                       (unsigned long long)done[i].bytes_client,
                                       (unsigned long long)done[i].bytes_compute);
        if (item == NULL) {
            Py_DECREF(list);
            free(done);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    free(done);
    return list;
}

static PyObject *Relay_fileno(RelayObject *r, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(r->done_fd);
}

PyDoc_STRVAR(stats_doc,
             "stats() -> (sessions, buffered, from_clients, from_computes): open sessions, the bytes waiting\n"
             "in their out buffers (read from one side, not yet written to the other), and the bytes read\n"
             "from clients and from computes by every session so far, open ones included.");

static PyObject *Relay_stats(RelayObject *r, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&r->lock);
    size_t live = r->live;
    pthread_mutex_unlock(&r->lock);
    return Py_BuildValue("(nnKK)", (Py_ssize_t)live, (Py_ssize_t)__atomic_load_n(&r->buffered, __ATOMIC_RELAXED),
                         (unsigned long long)__atomic_load_n(&r->relayed[CLIENT], __ATOMIC_RELAXED),
                         (unsigned long long)__atomic_load_n(&r->relayed[COMPUTE], __ATOMIC_RELAXED));
}

static PyObject *Relay_shutdown(RelayObject *r, PyObject *Py_UNUSED(ignored)) {
    stop_thread(r);
    Py_RETURN_NONE;
}

static PyMethodDef Relay_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Relay_add, METH_VARARGS | METH_KEYWORDS, add_doc},
    {"close", (PyCFunction)Relay_close, METH_O, close_doc},
    {"state", (PyCFunction)Relay_state, METH_O, state_doc},
    {"reap", (PyCFunction)Relay_reap, METH_NOARGS, reap_doc},
    {"stats", (PyCFunction)Relay_stats, METH_NOARGS, stats_doc},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "The eventfd that is readable when sessions ended."},
    {"shutdown", (PyCFunction)Relay_shutdown, METH_NOARGS, "Stop the thread and close every session's sockets."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "argon.proxy._relay.Relay",
    .tp_basicsize = sizeof(RelayObject),
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One relay thread: sessions are added by socket and reported on fileno() when they end.",
    .tp_methods = Relay_methods,
    .tp_new = Relay_new,
};

PyDoc_STRVAR(load_openssl_doc,
             "load_openssl(path) -> bool: find OpenSSL's functions through the already loaded module at\n"
             "`path` (Python's _ssl), so TLS sessions can be relayed natively. False when they cannot.");

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
             SYM(ERR_clear_error);
#undef SYM
    /* the handle stays open: these functions are used for the life of the process */
    if (!ok)
        Py_RETURN_FALSE;
    ossl = o;
    ossl_loaded = 1;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(tls_usable_doc,
             "tls_usable(obj) -> bool: whether `obj` (an `ssl.SSLObject._sslobj`) can be relayed natively.");

static PyObject *tls_usable(PyObject *Py_UNUSED(module), PyObject *obj) {
    return PyBool_FromLong(ssl_of(obj) != NULL);
}

static PyMethodDef module_methods[] = {
    {"load_openssl", load_openssl, METH_O, load_openssl_doc},
    {"tls_usable", tls_usable, METH_O, tls_usable_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef relay_module = {
    PyModuleDef_HEAD_INIT, "_relay", "The proxy's byte relay after login, on its own epoll thread.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__relay(void) {
    if (PyType_Ready(&RelayType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&relay_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
