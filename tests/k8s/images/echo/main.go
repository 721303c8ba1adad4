// The backend of the real-node tests: on every TCP connection and every UDP datagram it
// answers "<pod name> <peer address it saw>\n", so a test knows which pod answered and what
// source address the proxy left on the packet. With -connect ADDRESS it is the client
// instead: it prints the answer of one connection to ADDRESS and exits, or with -for it asks
// again every -every until that time has passed and prints "answered N failed M" (and each
// failure on standard error). With -connect and -dns NAME it asks the DNS server at ADDRESS
// for NAME (-type A or TXT, -class IN or CH, over TCP or -udp) instead and prints the answer's
// records on one line, space-separated: A records as addresses, TXT records as their text
// (CoreDNS's chaos plugin answers `-class CH -type TXT hostname.bind` with its pod's name).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"net"
	"os"
	"time"
)

func main() {
	listen := flag.String("listen", ":8080", "TCP and UDP address to answer on")
	connect := flag.String("connect", "", "ask ADDRESS once over TCP, print the answer and exit")
	udp := flag.Bool("udp", false, "with -connect: ask over UDP")
	timeout := flag.Duration("timeout", 3*time.Second, "with -connect: how long to wait")
	during := flag.Duration("for", 0, "with -connect: keep asking for this long")
	every := flag.Duration("every", 100*time.Millisecond, "with -for: pause between asks")
	dnsName := flag.String("dns", "", "with -connect: ask the DNS server at ADDRESS for this name")
	dnsType := flag.String("type", "A", "with -dns: the record type, A or TXT")
	dnsClass := flag.String("class", "IN", "with -dns: the class, IN or CH")
	flag.Parse()
	once := func() int { return ask(*connect, *udp, *timeout) }
	if *dnsName != "" {
		question, err := newQuestion(*dnsName, *dnsType, *dnsClass)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		once = func() int { return askDNS(*connect, *udp, *timeout, question) }
	}
	if *connect != "" && *during > 0 {
		os.Exit(askRepeatedly(once, *during, *every))
	}
	if *connect != "" {
		os.Exit(once())
	}
	name := os.Getenv("POD_NAME")
	if name == "" {
		name, _ = os.Hostname()
	}
	tcp, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen tcp:", err)
		os.Exit(1)
	}
	datagrams, err := net.ListenPacket("udp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen udp:", err)
		os.Exit(1)
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			_, peer, err := datagrams.ReadFrom(buf)
			if err != nil {
				continue
			}
			datagrams.WriteTo([]byte(name+" "+peer.String()+"\n"), peer)
		}
	}()
	for {
		conn, err := tcp.Accept()
		if err != nil {
			continue
		}
		go func(conn net.Conn) {
			defer conn.Close()
			conn.Write([]byte(name + " " + conn.RemoteAddr().String() + "\n"))
		}(conn)
	}
}

func ask(address string, udp bool, timeout time.Duration) int {
	network := "tcp"
	if udp {
		network = "udp"
	}
	conn, err := net.DialTimeout(network, address, timeout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		return 1
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	if udp {
		if _, err := conn.Write([]byte("?\n")); err != nil {
			fmt.Fprintln(os.Stderr, "write:", err)
			return 1
		}
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		fmt.Fprintln(os.Stderr, "read:", err)
		return 1
	}
	fmt.Print(line)
	return 0
}

func askRepeatedly(once func() int, during, every time.Duration) int {
	answered, failed := 0, 0
	deadline := time.Now().Add(during)
	for time.Now().Before(deadline) {
		if once() == 0 {
			answered++
		} else {
			failed++
		}
		time.Sleep(every)
	}
	fmt.Printf("answered %d failed %d\n", answered, failed)
	return 0
}
