/*
 * libstasis: callbacks, critical sections and self-requested checkpoints for programs that
 * run under Stasis. Link with -lstasis (libstasis.so or libstasis.a). Every function is a
 * cheap no-op when the program does not run under Stasis. Guarantees: docs/api.md.
 *
 * This header is checked against the library's Rust source (crates/stasis-lib/tests/header.rs):
 * every function and constant here must match one there, and the reverse.
 */
#ifndef STASIS_H
#define STASIS_H

#ifdef __cplusplus
extern "C" {
#endif

/* Callback phases. */
#define STASIS_PRE_CHECKPOINT 0  /* before the job is frozen for a checkpoint */
#define STASIS_POST_CHECKPOINT 1 /* after a checkpoint, the job continuing */
#define STASIS_POST_RESTART 2    /* after a restart */

/* Return values. */
#define STASIS_OK 0
#define STASIS_NOT_ACTIVE 1 /* not running under Stasis: nothing was done */
#define STASIS_RESTARTED 2  /* blocking request: resumed from that checkpoint after a restart */
#define STASIS_EINVAL (-1)  /* unknown phase, null callback, leave without enter */
#define STASIS_EFAIL (-2)   /* the supervisor could not be reached, or the checkpoint failed */
#define STASIS_EDEADLK (-3) /* blocking request inside a critical section or a callback */

/* What a callback receives. */
struct stasis_event {
    int phase;               /* STASIS_PRE_CHECKPOINT, STASIS_POST_CHECKPOINT, STASIS_POST_RESTART */
    unsigned int generation; /* being written (pre), written (post; 0: failed), restarted from */
    int is_restart;          /* 1 after a restart */
};

/* 1 when running under a reachable Stasis supervisor, else 0. */
int stasis_is_active(void);

/* Registers cb(event, arg) for phase; callbacks run on the library's thread, in registration
 * order. Returns STASIS_OK, STASIS_NOT_ACTIVE, or STASIS_EINVAL. */
int stasis_register(int phase, void (*cb)(const struct stasis_event *event, void *arg), void *arg);

/* Critical sections: nestable, from any thread. No checkpoint is taken while any thread is
 * inside one; entering waits while a checkpoint is under way. */
int stasis_critical_enter(void);
int stasis_critical_leave(void);

/* Asks for a checkpoint of this job (it continues afterwards). blocking != 0: returns once
 * the generation is written (STASIS_OK), or STASIS_RESTARTED in a process restarted from it. */
int stasis_request_checkpoint(int blocking);

#ifdef __cplusplus
}
#endif

#endif /* STASIS_H */
