// A DNS client of the standard library only (the image stays one small static program): one
// question, one answer, its records of the asked type printed.
package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"time"
)

const (
	typeA   = 1
	typeTXT = 16
	classIN = 1
	classCH = 3
)

type question struct {
	name  string
	qtype uint16
	class uint16
}

func newQuestion(name, qtype, class string) (question, error) {
	q := question{name: strings.TrimSuffix(name, ".")}
	switch strings.ToUpper(qtype) {
	case "A":
		q.qtype = typeA
	case "TXT":
		q.qtype = typeTXT
	default:
		return q, fmt.Errorf("record type %q: A or TXT", qtype)
	}
	switch strings.ToUpper(class) {
	case "IN":
		q.class = classIN
	case "CH":
		q.class = classCH
	default:
		return q, fmt.Errorf("class %q: IN or CH", class)
	}
	return q, nil
}

// askDNS sends q to the server at address and prints the answer's records on one line.
func askDNS(address string, udp bool, timeout time.Duration, q question) int {
	id := uint16(rand.UintN(1 << 16))
	records, err := exchange(address, udp, timeout, q, id)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dns:", err)
		return 1
	}
	if len(records) == 0 {
		fmt.Fprintln(os.Stderr, "dns: no record of the asked type in the answer")
		return 1
	}
	fmt.Println(strings.Join(records, " "))
	return 0
}

func exchange(address string, udp bool, timeout time.Duration, q question, id uint16) ([]string, error) {
	network := "tcp"
	if udp {
		network = "udp"
	}
	conn, err := net.DialTimeout(network, address, timeout)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	query, err := encodeQuery(q, id)
	if err != nil {
		return nil, err
	}
	var reply []byte
	if udp {
		if _, err := conn.Write(query); err != nil {
			return nil, err
		}
		buf := make([]byte, 65535)
		n, err := conn.Read(buf)
		if err != nil {
			return nil, err
		}
		reply = buf[:n]
	} else {
		// Over TCP each message is preceded by its length (RFC 1035 4.2.2).
		framed := binary.BigEndian.AppendUint16(nil, uint16(len(query)))
		if _, err := conn.Write(append(framed, query...)); err != nil {
			return nil, err
		}
		var length [2]byte
		if _, err := io.ReadFull(conn, length[:]); err != nil {
			return nil, err
		}
		reply = make([]byte, binary.BigEndian.Uint16(length[:]))
		if _, err := io.ReadFull(conn, reply); err != nil {
			return nil, err
		}
	}
	return decodeAnswer(reply, q, id)
}

func encodeQuery(q question, id uint16) ([]byte, error) {
	// Header: the id, recursion desired, one question.
	msg := binary.BigEndian.AppendUint16(nil, id)
	msg = append(msg, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0)
	for _, label := range strings.Split(q.name, ".") {
		if len(label) == 0 || len(label) > 63 {
			return nil, fmt.Errorf("name %q: a label is empty or longer than 63", q.name)
		}
		msg = append(msg, byte(len(label)))
		msg = append(msg, label...)
	}
	msg = append(msg, 0)
	msg = binary.BigEndian.AppendUint16(msg, q.qtype)
	return binary.BigEndian.AppendUint16(msg, q.class), nil
}

var errShort = errors.New("the answer is cut short")

func decodeAnswer(msg []byte, q question, id uint16) ([]string, error) {
	if len(msg) < 12 {
		return nil, errShort
	}
	if binary.BigEndian.Uint16(msg) != id || msg[2]&0x80 == 0 {
		return nil, errors.New("not the answer to this question")
	}
	if rcode := msg[3] & 0x0f; rcode != 0 {
		return nil, fmt.Errorf("the server answered rcode %d", rcode)
	}
	questions := binary.BigEndian.Uint16(msg[4:])
	answers := binary.BigEndian.Uint16(msg[6:])
	at := 12
	for range questions {
		next, err := skipName(msg, at)
		if err != nil {
			return nil, err
		}
		at = next + 4
	}
	var records []string
	for range answers {
		next, err := skipName(msg, at)
		if err != nil {
			return nil, err
		}
		if next+10 > len(msg) {
			return nil, errShort
		}
		rtype := binary.BigEndian.Uint16(msg[next:])
		length := int(binary.BigEndian.Uint16(msg[next+8:]))
		data := msg[next+10:]
		if length > len(data) {
			return nil, errShort
		}
		data = data[:length]
		at = next + 10 + length
		switch {
		case rtype != q.qtype:
		case rtype == typeA && length == 4:
			records = append(records, net.IP(data).String())
		case rtype == typeTXT:
			records = append(records, txtOf(data))
		}
	}
	return records, nil
}

// skipName returns where the name at msg[at:] ends (a label sequence or a pointer).
func skipName(msg []byte, at int) (int, error) {
	for {
		if at >= len(msg) {
			return 0, errShort
		}
		length := int(msg[at])
		switch {
		case length == 0:
			return at + 1, nil
		case length&0xc0 == 0xc0:
			return at + 2, nil
		default:
			at += 1 + length
		}
	}
}

// txtOf joins a TXT record's character strings.
func txtOf(data []byte) string {
	var text strings.Builder
	for len(data) > 0 {
		n := int(data[0])
		if 1+n > len(data) {
			break
		}
		text.Write(data[1 : 1+n])
		data = data[1+n:]
	}
	return text.String()
}
