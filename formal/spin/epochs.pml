/* qgw/1 rekey and epoch-slot state machine (docs/protocol.md §5 RK1-RK7, §6 REC2, §7).

   Run (from this folder):
     spin -a epochs.pml && gcc -O2 -DSAFETY -o pan pan.c && ./pan -m100000
   Sanity variant (the responder has no `next` slot: it switches to the new epoch at RK4):
     spin -DNO_NEXT -a epochs.pml && gcc -O2 -DSAFETY -o pan pan.c && ./pan -m100000
   must report an assertion violation (a counterexample trail); so must -DFORGET_NEXT (the
   responder's `next` chain is not kept in the association across connections).

   What is modelled, mirroring gateway/core/connection.py:
   - the initiator I (master SAE, the only side that starts rekeys) and the responder R;
   - the association of each side (chain epoch; R also its `next` (epoch, chain)), which outlives
     a TCP connection, and each connection's key slots: I has current + previous receive key,
     R has current + `next` (new keys wait there until the first record of the new epoch, RK7);
   - the WAN connection as two FIFO channels (TCP: in order within one direction, frames of the
     two directions cross in any interleaving);
   - loss: the network may break the connection at any moment (at most MAXDROPS times): every
     frame in flight is lost, both sides wipe the connection's keys, and the initiator resumes
     on a new connection with REKEY_INIT (RK1-RK7 instead of a bootstrap, §5 "Resumption");
   - records: each side sends at most RECS data records per epoch (so the model is finite), and
     I sends EPOCH_CONFIRM as its first record of a new epoch (RK6).
   Cryptography, QKD keys, timers and the policy are not modelled here (see formal/proverif);
   a handshake timeout is one more way for the connection to break (covered by the drops).

   Properties checked (assertions; spin also reports invalid end states = deadlocks):
   P1 honest peers never hit a protocol failure (no alert 8/12/13) whatever the interleaving
      and the losses: every frame is accepted by the rules of RK3, RK5, RK7 and REC2;
   P2 no deadlock: when nothing can move any more (spin `timeout`), both sides are connected,
      quiet, and agree: the same current epoch, the same chain epoch, nothing in `next`;
   P3 keys of an epoch are erased within one epoch: I holds keys only of its current and
      previous epoch, R only of its current and `next` epoch, never more than two epochs each;
   P4 the chain epochs never drift apart by more than one (R's `next` covers the gap).
*/

#ifndef MAXREKEY
#define MAXREKEY 3   /* rekeys the initiator starts on a live connection */
#endif
#ifndef MAXDROPS
#define MAXDROPS 3   /* connection breaks by the network */
#endif
#ifndef RECS
#define RECS 2       /* data records per side and epoch */
#endif
#define NE 8         /* epochs 0 .. NE-1 (> MAXREKEY + MAXDROPS + 1) */
#define NONE 255

mtype = { RKINIT, RKRESP, REC };
chan i2r = [3] of { mtype, byte };
chan r2i = [3] of { mtype, byte };

/* initiator */
byte Ia = 0;          /* association: chain epoch */
byte Icur = 0;        /* connection: current send/receive epoch */
byte Iprev = NONE;    /* connection: previous receive epoch, until R's first record of Icur */
bool Iconn = true;    /* connection established (bootstrap done: epoch 0) */
bool Iwait = false;   /* rekey phase EXPECT_REKEY_RESP (also while resuming) */
byte Irk = 0;         /* rekeys started */
byte Isent = 0;       /* data records sent in Icur */
bool Ik[NE];          /* I holds traffic keys of epoch k */

/* responder */
byte Ra = 0;          /* association: chain epoch */
byte Ranext = NONE;   /* association: `next` chain epoch awaiting confirmation */
byte Rcur = 0;        /* connection: current epoch */
byte Rnext = NONE;    /* connection: `next` key slot */
bool Rest = true;     /* connection established (R_EXPECT_EPOCH_CONFIRM until promotion) */
byte Rsent = 0;
bool Rk[NE];

byte drops = 0;
bool alert = false;   /* a protocol failure between honest peers (P1) */

#define ALERT  alert = true

/* P3 and P4, checked in every state by the monitor below. */
#define KEYS_OK(k) ((!Ik[k] || k == Icur || k == Iprev) && (!Rk[k] || k == Rcur || k == Rnext))
#define INV (!alert && KEYS_OK(0) && KEYS_OK(1) && KEYS_OK(2) && KEYS_OK(3) && KEYS_OK(4) \
             && KEYS_OK(5) && KEYS_OK(6) && KEYS_OK(7) \
             && (Ia == Ra || Ia == Ra + 1 || Ra == Ia + 1))

active proctype monitor() {
end:
  atomic { !(INV) -> assert(INV) }
}

inline wipe_conn() {
  /* the connection breaks: frames in flight are lost, each side wipes its connection keys */
  do :: i2r ? _, _ :: empty(i2r) -> break od;
  do :: r2i ? _, _ :: empty(r2i) -> break od;
  byte k = 0;
  do :: k < NE -> Ik[k] = false; Rk[k] = false; k++ :: else -> break od;
  Iconn = false; Iwait = false; Iprev = NONE; Icur = NONE; Isent = 0;
  Rest = false; Rnext = NONE; Rcur = NONE; Rsent = 0;
#ifdef FORGET_NEXT
  Ranext = NONE;  /* sanity variant: `next` kept per connection only, not in the association */
#endif
}

active proctype network() {
  do
  :: atomic { drops < MAXDROPS -> drops++; wipe_conn() }
  :: break   /* the network may also stop breaking connections at any time */
  od
}

active proctype initiator() {
  byte e;
end:
  do
  /* RK1/RK2 on a live connection: REKEY_INIT for chain epoch + 1; records keep flowing */
  :: atomic { Iconn && !Iwait && Irk < MAXREKEY && nfull(i2r) ->
       Irk++; Iwait = true; i2r ! RKINIT, Ia + 1 }
  /* resumption: a new connection starts with RK1/RK2 (state I_EXPECT_REKEY_RESP) */
  :: atomic { !Iconn && !Iwait && nfull(i2r) -> Iwait = true; i2r ! RKINIT, Ia + 1 }
  /* REC1: a data record under the current epoch */
  :: atomic { Iconn && Isent < RECS && nfull(i2r) -> Isent++; i2r ! REC, Icur }
  /* RK5/RK6: REKEY_RESP accepted only in phase EXPECT_REKEY_RESP and for the epoch asked */
  :: atomic { nfull(i2r) && r2i ? [RKRESP, _] -> r2i ? RKRESP, e;
       if
       :: Iwait && e == Ia + 1 ->
            /* _install_epoch: wipe the old previous key, current receive key becomes previous */
            if :: Iprev != NONE -> Ik[Iprev] = false :: else -> skip fi;
            if :: Iconn -> Iprev = Icur :: else -> Iprev = NONE fi;
            Icur = e; Ik[e] = true; Ia = e; Iwait = false; Iconn = true; Isent = 0;
            /* the current send key of the old epoch is gone; only its receive key stays */
            i2r ! REC, e   /* EPOCH_CONFIRM, the first record of the new epoch */
       :: else -> ALERT  /* alert 12 / 8 */
       fi }
  /* REC2 at the initiator: current, or previous until R's first record of the new epoch */
  :: atomic { r2i ? REC, e ->
       if
       :: Iconn && e == Icur ->
            if :: Iprev != NONE -> Ik[Iprev] = false; Iprev = NONE :: else -> skip fi
       :: Iconn && e == Iprev -> skip
       :: else -> ALERT  /* alert 13 */
       fi }
  /* P2: nothing can move any more: the sides must be quiet and agree */
  :: timeout ->
       assert(Iconn && Rest && !Iwait && Rnext == NONE && Ranext == NONE
              && Icur == Rcur && Ia == Ra && Ia == Icur);
       break
  od
}

active proctype responder() {
  byte e;
end:
  do
  /* RK3/RK4 */
  :: atomic { nfull(r2i) && i2r ? [RKINIT, _] -> i2r ? RKINIT, e;
       if
       :: e == Ra + 1 -> skip            /* base = current chain */
       :: Ranext != NONE && e == Ranext + 1 ->
            /* the initiator moved to `next` before we saw its first record: promote first */
            Ra = Ranext; Ranext = NONE;
            if
            :: Rnext != NONE ->           /* _promote_if_pending on this connection */
                 Rk[Rcur] = false; Rcur = Rnext; Rnext = NONE; Rsent = 0
            :: else -> skip
            fi
       :: else -> ALERT; goto done       /* alert 8 */
       fi;
#ifdef NO_NEXT
       /* sanity variant: no `next` slot, R switches to the new epoch at once */
       if :: Rcur != NONE -> Rk[Rcur] = false :: else -> skip fi;
       Rcur = e; Rk[e] = true; Ra = e; Rest = true; Rsent = 0;
#else
       if :: Rnext != NONE -> Rk[Rnext] = false :: else -> skip fi;
       Rnext = e; Rk[e] = true; Ranext = e;
#endif
       r2i ! RKRESP, e;
done:  skip }
  /* REC1 at the responder: only once established on this connection */
  :: atomic { Rest && Rsent < RECS && nfull(r2i) -> Rsent++; r2i ! REC, Rcur }
  /* REC2 and RK7: the first record of `next` promotes it; R switches sending to it */
  :: atomic { i2r ? REC, e ->
       if
       :: Rnext != NONE && e == Rnext ->
            if :: Rcur != NONE -> Rk[Rcur] = false :: else -> skip fi;
            Rcur = Rnext; Rnext = NONE; Ra = Rcur; Ranext = NONE; Rest = true; Rsent = 0
       :: Rest && e == Rcur -> skip
       :: else -> ALERT  /* alert 13 / 12 */
       fi }
  od
}
