package scheduler

import (
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"sync"
)

// Script replies. A script answers a flat array of name, value pairs,
// {"outcome", "ok", "position", 3, ...}, which decodeReply reads into a
// struct by its fields' `redis:"name"` tags: nobody reads a reply by its
// values' places. A name the struct does not know is ignored, and a field
// the reply does not name stays zero, so a script may add to its reply
// without breaking a reader, and a reply may leave out what does not
// apply.
//
// Values are what Redis makes of Lua's: integers (a Lua number is
// truncated to one, so a fraction is sent as a string, see numstr in
// lua/prelude.lua), strings, nested arrays, and nil (Lua's false). A nested
// array is a list (into a slice or an array) or pairs again (into a struct,
// or a map by name). Lua's nil cannot be a value: it ends a table, so every
// value a script puts in its reply must be there.

// decodeReply decodes reply, a flat array of name, value pairs, into the
// struct out points to.
func decodeReply(reply any, out any) error {
	v := reflect.ValueOf(out)
	if v.Kind() != reflect.Pointer || v.IsNil() || v.Elem().Kind() != reflect.Struct {
		return fmt.Errorf("scheduler: decoding a reply into %T: not a pointer to a struct", out)
	}
	if err := decodePairs(reply, v.Elem()); err != nil {
		return fmt.Errorf("scheduler: reply into %s: %w", v.Elem().Type(), err)
	}
	return nil
}

// decodePairs decodes name, value pairs into a struct or a map.
func decodePairs(reply any, v reflect.Value) error {
	list, ok := reply.([]any)
	if !ok {
		return fmt.Errorf("a %T, not name, value pairs", reply)
	}
	if len(list)%2 != 0 {
		return fmt.Errorf("%d values, not name, value pairs", len(list))
	}
	var fields map[string]int
	if v.Kind() == reflect.Struct {
		fields = replyFields(v.Type())
	} else if v.IsNil() {
		v.Set(reflect.MakeMapWithSize(v.Type(), len(list)/2))
	}
	for i := 0; i < len(list); i += 2 {
		name, ok := list[i].(string)
		if !ok {
			return fmt.Errorf("name %d is a %T, not a string", i/2+1, list[i])
		}
		if fields == nil {
			e := reflect.New(v.Type().Elem()).Elem()
			if err := decodeValue(list[i+1], e); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			v.SetMapIndex(reflect.ValueOf(name).Convert(v.Type().Key()), e)
			continue
		}
		f, ok := fields[name]
		if !ok {
			continue
		}
		if err := decodeValue(list[i+1], v.Field(f)); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

var replyFieldsCache sync.Map // reflect.Type → map[string]int

// replyFields maps the reply names of struct type t to its fields.
func replyFields(t reflect.Type) map[string]int {
	if m, ok := replyFieldsCache.Load(t); ok {
		return m.(map[string]int)
	}
	m := map[string]int{}
	for i := range t.NumField() {
		f := t.Field(i)
		if name := f.Tag.Get("redis"); name != "" && name != "-" && f.IsExported() {
			m[name] = i
		}
	}
	replyFieldsCache.Store(t, m)
	return m
}

// decodeValue decodes one value of a reply into v.
func decodeValue(x any, v reflect.Value) error {
	if x == nil { // Lua's false
		v.SetZero()
		return nil
	}
	if err, ok := x.(error); ok {
		return err
	}
	switch v.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		n, err := replyInt(x)
		if err != nil {
			return err
		}
		if v.OverflowInt(n) {
			return fmt.Errorf("%d overflows %s", n, v.Type())
		}
		v.SetInt(n)
	case reflect.Float32, reflect.Float64:
		f, err := replyFloat(x)
		if err != nil {
			return err
		}
		v.SetFloat(f)
	case reflect.String:
		switch s := x.(type) {
		case string:
			v.SetString(s)
		case int64:
			v.SetString(strconv.FormatInt(s, 10))
		default:
			return fmt.Errorf("a %T, not a string", x)
		}
	case reflect.Bool:
		switch b := x.(type) {
		case bool: // Lua's true, to a RESP3 client
			v.SetBool(b)
		case int64:
			v.SetBool(b != 0)
		case string:
			v.SetBool(b != "" && b != "0")
		default:
			return fmt.Errorf("a %T, not a boolean", x)
		}
	case reflect.Slice, reflect.Array:
		list, ok := x.([]any)
		if !ok {
			return fmt.Errorf("a %T, not a list", x)
		}
		if v.Kind() == reflect.Array {
			if len(list) > v.Len() {
				return fmt.Errorf("%d values for %s", len(list), v.Type())
			}
			v.SetZero()
		} else if len(list) == 0 {
			v.SetZero()
			return nil
		} else {
			v.Set(reflect.MakeSlice(v.Type(), len(list), len(list)))
		}
		for i, e := range list {
			if err := decodeValue(e, v.Index(i)); err != nil {
				return fmt.Errorf("[%d]: %w", i, err)
			}
		}
	case reflect.Struct:
		v.SetZero() // a nested reply replaces the field
		return decodePairs(x, v)
	case reflect.Map:
		if v.Type().Key().Kind() != reflect.String {
			return fmt.Errorf("unsupported %s", v.Type())
		}
		v.SetZero()
		return decodePairs(x, v)
	default:
		return fmt.Errorf("unsupported %s", v.Type())
	}
	return nil
}

var errNotNumber = errors.New("not a number")

func replyInt(x any) (int64, error) {
	switch n := x.(type) {
	case int64:
		return n, nil
	case bool:
		if n {
			return 1, nil
		}
		return 0, nil
	case string:
		i, err := strconv.ParseInt(n, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%q: %w", n, errNotNumber)
		}
		return i, nil
	case float64: // a RESP3 double
		return int64(n), nil
	}
	return 0, fmt.Errorf("a %T: %w", x, errNotNumber)
}

func replyFloat(x any) (float64, error) {
	switch n := x.(type) {
	case int64:
		return float64(n), nil
	case float64:
		return n, nil
	case string:
		f, err := strconv.ParseFloat(n, 64)
		if err != nil {
			return 0, fmt.Errorf("%q: %w", n, errNotNumber)
		}
		return f, nil
	}
	return 0, fmt.Errorf("a %T: %w", x, errNotNumber)
}
