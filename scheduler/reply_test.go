package scheduler

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

type replyItem struct {
	ID string `redis:"id"`
	N  int    `redis:"n"`
}

type replyAll struct {
	Outcome  Outcome          `redis:"outcome"`
	Int      int              `redis:"int"`
	Int64    int64            `redis:"int64"`
	IntStr   int              `redis:"int_str"`
	Float    float64          `redis:"float"`
	FloatI   float64          `redis:"float_int"`
	Str      string           `redis:"str"`
	StrInt   string           `redis:"str_int"`
	Yes      bool             `redis:"yes"`
	No       bool             `redis:"no"`
	True     bool             `redis:"true"`
	Nil      int              `redis:"nil"`
	Floats   [3]float64       `redis:"floats"`
	Ints     []int            `redis:"ints"`
	Empty    []int            `redis:"empty"`
	Items    []replyItem      `redis:"items"`
	Nested   replyItem        `redis:"nested"`
	Map      map[string]int64 `redis:"map"`
	Missing  int              `redis:"missing"`
	Untagged int
}

func TestDecodeReplyTypes(t *testing.T) {
	reply := []any{
		"outcome", "ok",
		"int", int64(-3),
		"int64", int64(1 << 40),
		"int_str", "42",
		"float", "0.123456789",
		"float_int", int64(7),
		"str", "job_1",
		"str_int", int64(1712345678901),
		"yes", int64(1),
		"no", int64(0),
		"true", true,
		"nil", nil,
		"floats", []any{"1.5", "-0.25", int64(3)},
		"ints", []any{int64(1), int64(2)},
		"empty", []any{},
		"items", []any{[]any{"id", "a", "n", int64(1)}, []any{"n", int64(2), "id", "b"}},
		"nested", []any{"id", "x", "n", int64(9)},
		"map", []any{"rl", int64(50), "at", int64(1712345678901)},
		"unknown", []any{"ignored", int64(1)},
		"Untagged", int64(5),
	}
	var got replyAll
	if err := decodeReply(reply, &got); err != nil {
		t.Fatal(err)
	}
	want := replyAll{
		Outcome: Admitted, Int: -3, Int64: 1 << 40, IntStr: 42, Float: 0.123456789, FloatI: 7,
		Str: "job_1", StrInt: "1712345678901", Yes: true, No: false, True: true,
		Floats: [3]float64{1.5, -0.25, 3}, Ints: []int{1, 2},
		Items: []replyItem{{"a", 1}, {"b", 2}}, Nested: replyItem{"x", 9},
		Map: map[string]int64{"rl": 50, "at": 1712345678901},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("decoded\n%+v\nwant\n%+v", got, want)
	}
}

func TestDecodeReplyMissingFields(t *testing.T) {
	out := replyAll{Int: 5, Str: "kept"}
	if err := decodeReply([]any{"outcome", "conflict"}, &out); err != nil {
		t.Fatal(err)
	}
	if out.Outcome != Conflict || out.Int != 5 || out.Str != "kept" || out.Items != nil || out.Map != nil {
		t.Fatalf("fields the reply does not name changed: %+v", out)
	}
	var empty replyAll
	if err := decodeReply([]any{}, &empty); err != nil || !reflect.DeepEqual(empty, replyAll{}) {
		t.Fatalf("an empty reply: %+v, %v", empty, err)
	}
	// An empty nested reply (a script's {} for "none") is a zero struct.
	nested := replyAll{Nested: replyItem{"x", 1}}
	if err := decodeReply([]any{"nested", []any{}}, &nested); err != nil || nested.Nested != (replyItem{}) {
		t.Fatalf("an empty nested reply: %+v, %v", nested.Nested, err)
	}
}

func TestDecodeReplyErrors(t *testing.T) {
	scriptErr := errors.New("ERR nested")
	for _, c := range []struct {
		name  string
		reply any
		want  string
	}{
		{"odd length", []any{"outcome", "ok", "position"}, "3 values"},
		{"odd nested", []any{"nested", []any{"id"}}, "nested: 1 values"},
		{"not an array", int64(1), "not name, value pairs"},
		{"name not a string", []any{int64(1), int64(2)}, "name 1 is a int64"},
		{"not a number", []any{"int", "x"}, `int: "x": not a number`},
		{"not a list", []any{"ints", int64(1)}, "ints: a int64, not a list"},
		{"array too long", []any{"floats", []any{"1", "2", "3", "4"}}, "4 values for [3]float64"},
		{"bad element", []any{"items", []any{[]any{"n", "many"}}}, "items: [0]: n:"},
		{"nested error", []any{"int", scriptErr}, "ERR nested"},
	} {
		var out replyAll
		err := decodeReply(c.reply, &out)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error with %q", c.name, err, c.want)
		}
	}
	var n int
	if err := decodeReply([]any{}, &n); err == nil {
		t.Error("decoded into an int")
	}
	var out replyAll
	if err := decodeReply([]any{"int", scriptErr}, &out); !errors.Is(err, scriptErr) {
		t.Errorf("a nested error: %v", err)
	}
}
