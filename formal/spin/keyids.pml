/* qgw/1 key-ID reuse: the responder's used-ID set and the KME (docs/protocol.md §3.4 B3, B4;
   §5 RK3 "duplicate or already used key ID"; §11 key-ID reuse).

   Run (from this folder):
     spin -a keyids.pml && gcc -O2 -DSAFETY -o pan pan.c && ./pan -m200000
   Variants (spin -D...): KME_REPEATS (the KME hands out a key for the same ID again, as the
   ProVerif models' kme table does), NO_USED_SET (the responder keeps no used-ID set),
   RESTARTS=n (responder restarts, each one empties the set: it lives in the association, in
   memory), CAP=n (the set's capacity; gateway/core/labels.py REPLAY_CACHE_SIZE = 4096, here
   CAP >= NK stands for "more than the IDs the attacker can replay").

   Why spin and not ProVerif: "refuse an ID that is already in the set" is a lookup that must
   fail, and ProVerif's Horn-clause abstraction cannot show that a `get ... else` branch is
   *not* taken (tables only grow, the else branch is always assumed possible): with a used-ID
   table its injective query "the responder uses each key ID for one INIT only" stays false.
   The state here is exact.

   What is modelled, mirroring gateway/core/connection.py (Association.remember, B3/B4):
   - the initiator (master SAE) fetches key IDs 1..NK one after the other (B1) and sends an
     INIT with each; INITs are public, and in pki mode the admission MAC is public too, so the
     attacker may send any number of INITs carrying any ID it has seen (replays, or its own
     INIT with a real ID);
   - the responder, for each INIT: B3 refuses an ID already in its used-ID set (alert 8) and
     otherwise adds it (FIFO, the oldest entry evicted beyond CAP); B4 asks the KME
     (dec_keys); a delivered key enters this INIT's schedule ("a use");
   - the KME delivers the key of an ID the master fetched, once (ETSI GS QKD 014: a key is gone
     once the slave SAE has it), or again and again with KME_REPEATS;
   - a responder restart empties the used-ID set (at most RESTARTS times).
   Property (assertion): no key ID's key enters the schedule of two INITs (a QKD key, or a
   Wegman-Carter pad in a rekey, serves one session only).
*/

#ifndef NK
#define NK 3
#endif
#ifndef CAP
#define CAP 4
#endif
#ifndef RESTARTS
#define RESTARTS 1
#endif

byte fetched = 0;      /* the master fetched IDs 1..fetched (B1) */
bool delivered[NK + 1];/* the KME delivered ID k to the slave SAE */
byte uses[NK + 1];     /* INITs whose schedule got the key of ID k (B4 delivered) */
byte used[CAP];        /* the responder's used-ID set, oldest first */
byte nused = 0;
byte restarts = 0;
byte k, i;
bool seen;

active proctype World() {
  do
  :: fetched < NK -> fetched++          /* B1 + B2: a new key ID, an honest INIT with it */
  :: fetched > 0 ->                      /* an INIT with a seen ID reaches the responder */
     atomic {
       k = 1;
       do                                /* the attacker (or the honest INIT) picks the ID */
       :: k < fetched -> k++
       :: break
       od;
       /* B3: key_ID not in the used-ID set; then it is marked used (either way, B4) */
       seen = false;
#ifndef NO_USED_SET
       i = 0;
       do
       :: i < nused && used[i] == k -> seen = true; break
       :: i < nused && used[i] != k -> i++
       :: i >= nused -> break
       od;
#endif
       if
       :: seen -> skip                   /* alert 8 replay: the KME is never asked */
       :: !seen ->
#ifndef NO_USED_SET
          if
          :: nused == CAP ->             /* evict the oldest */
             i = 0;
             do
             :: i + 1 < CAP -> used[i] = used[i + 1]; i++
             :: else -> break
             od;
             used[CAP - 1] = k
          :: nused < CAP -> used[nused] = k; nused++
          fi;
#endif
          /* B4 dec_keys(k) */
          if
#ifdef KME_REPEATS
          :: true ->
#else
          :: !delivered[k] ->
#endif
             delivered[k] = true;
             uses[k]++;
             assert(uses[k] <= 1)
          :: else -> skip                /* none delivered: preferred qkd_used = 0, or alert 6 */
          fi
       fi;
       k = 0; i = 0; seen = false
     }
  :: restarts < RESTARTS ->              /* the responder process restarts: the set is empty */
     atomic {
       i = 0;
       do
       :: i < CAP -> used[i] = 0; i++
       :: else -> break
       od;
       nused = 0; restarts++; i = 0
     }
  od
}
