package scheduler

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"
)

// Admissions to one group go to Redis together. An admission that finds
// fewer than maxAdmitCalls calls of its group under way (in this process)
// makes one at once, for itself alone; those that arrive while that many
// run wait in the group's line, and the first of them, when a call has
// answered, makes the next call for up to maxAdmitCall of them. A lone
// admission waits for nobody, and under load one script's start, limiter
// read, totals and wake-up serve many (lua/admit.lua decides each job as
// if it came alone, in line order). Two calls under way keep Redis busy
// while the answer of one travels back and the next is made.
//
// An admission whose context ends while it waits in line leaves the line
// and is not sent. One whose context ends while its call runs returns at
// once, not knowing whether its job was admitted, as a single call cut
// short would. The call itself runs until the latest deadline of the
// admissions in it, so that one client giving up does not cut the others'
// call short.

// maxAdmitCall is the most admissions one call of lua/admit.lua takes:
// the call holds Redis for about as long as that many single ones would.
const maxAdmitCall = 32

// maxAdmitCalls is how many calls of one group a process has under way
// at most.
const maxAdmitCalls = 2

// admitLine is one group's line of admissions.
type admitLine struct {
	mu      sync.Mutex
	calls   int          // calls under way (or their makers choosing the next)
	waiting []*admitWait // in arrival order
}

// admitWait is one admission, waiting or in a call.
type admitWait struct {
	in  admitIn
	ctx context.Context
	// wake gets true when this admission is to make the next call, or
	// false when its call answered (out, err).
	wake chan bool
	// Under the line's mu: lead when it was chosen to make the next call,
	// taken when it is in a call (or answered without one).
	lead, taken bool
	out         admitOut
	err         error
}

func (s *Scheduler) line(group string) *admitLine {
	if l, ok := s.lines.Load(group); ok {
		return l.(*admitLine)
	}
	l, _ := s.lines.LoadOrStore(group, &admitLine{})
	return l.(*admitLine)
}

// runAdmit admits in through its group's line.
func (s *Scheduler) runAdmit(ctx context.Context, in admitIn) (admitOut, error) {
	l := s.line(in.Group.Name)
	w := &admitWait{in: in, ctx: ctx, wake: make(chan bool, 1)}
	l.mu.Lock()
	l.waiting = append(l.waiting, w)
	if l.calls < maxAdmitCalls {
		l.calls++
		w.lead = true
		l.mu.Unlock()
		return s.lead(l, w)
	}
	l.mu.Unlock()
	select {
	case lead := <-w.wake:
		if lead {
			return s.lead(l, w)
		}
		return w.out, w.err
	case <-ctx.Done():
	}
	l.mu.Lock()
	switch {
	case w.lead:
		// Chosen to make the next call: it does, for those behind it.
		l.mu.Unlock()
		<-w.wake
		return s.lead(l, w)
	case !w.taken:
		l.waiting = slices.DeleteFunc(l.waiting, func(x *admitWait) bool { return x == w })
	default:
		// In a call: its answer may be here already.
		l.mu.Unlock()
		select {
		case <-w.wake:
			return w.out, w.err
		default:
			return admitOut{}, ctx.Err()
		}
	}
	l.mu.Unlock()
	return admitOut{}, ctx.Err()
}

// lead makes one call for the head of the line (self first), answers
// everyone in it, and hands the line to whoever waits next.
func (s *Scheduler) lead(l *admitLine, self *admitWait) (admitOut, error) {
	l.mu.Lock()
	var call, rest []*admitWait
	for _, w := range l.waiting {
		// Another admission chosen to make a call makes its own.
		if len(call) == maxAdmitCall || (w.lead && w != self) {
			rest = append(rest, w)
			continue
		}
		w.taken = true
		if err := w.ctx.Err(); err != nil {
			// Gave up before its call: not sent.
			w.err = err
			if w != self {
				w.wake <- false
			}
			continue
		}
		call = append(call, w)
	}
	l.waiting = rest
	l.mu.Unlock()
	defer l.handOn()
	if len(call) == 0 {
		return self.out, self.err
	}
	ins := make(admitCall, len(call))
	for i, w := range call {
		ins[i] = w.in
	}
	ctx, cancel := callContext(self.ctx, call)
	outs, err := func() (outs []admitOut, err error) {
		// A panic would leave the others waiting forever: it is their error.
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("scheduler: admit call: %v", r)
			}
		}()
		return s.runAdmitCall(ctx, ins)
	}()
	cancel()
	for i, w := range call {
		if err != nil {
			w.err = err
		} else {
			w.out = outs[i]
		}
		if w != self {
			w.wake <- false
		}
	}
	return self.out, self.err
}

// handOn ends a call: the first admission waiting that was not chosen
// already makes the next one; with none, the line has one call fewer
// under way. (Two calls can end before the first one chosen takes its
// place: each must choose a different one, or a call's place is lost.)
func (l *admitLine) handOn() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, w := range l.waiting {
		if !w.lead {
			w.lead = true
			w.wake <- true
			return
		}
	}
	l.calls--
}

// callContext is a call's context: base's values, no cancellation, and the
// latest deadline of the admissions in it (none when one of them has none).
func callContext(base context.Context, call []*admitWait) (context.Context, context.CancelFunc) {
	var last time.Time
	for _, w := range call {
		d, ok := w.ctx.Deadline()
		if !ok {
			return context.WithCancel(context.WithoutCancel(base))
		}
		if d.After(last) {
			last = d
		}
	}
	return context.WithDeadline(context.WithoutCancel(base), last)
}
