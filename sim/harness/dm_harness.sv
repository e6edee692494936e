`timescale 1ns/1ps
// tw_dm_harness: Verilator test harness of the datamover channels and the lock unit.
//
// It holds one MM2S channel (`tw_dm_mm2s`), one S2MM channel (`tw_dm_s2mm`), a lock unit
// (`tw_lock_unit`, port 0: MM2S, port 1: S2MM) and a word memory of 2**ADDR_BITS words with
// one read port (MM2S) and one write port (S2MM); a read returns the old word when both hit
// one address in one cycle. Pseudo-random back-pressure, one xorshift32 generator per source,
// seeded from `seed`: each cycle a source is "on" with probability thr/256 (`thr_*`, 0..256):
//   thr_out_ready  MM2S stream ready        thr_in_valid  S2MM stream valid (held until taken)
//   thr_rd_grant   memory read grant        thr_wr_grant  memory write grant
// `rdata` carries a junk word in every cycle that does not follow a granted read.
//
// The clock is generated here; cocotb (tilewright.sim.datamover_tb) only issues commands.
// Files of job N live in "<TW_DIR>/jobN/" (plusarg +TW_DIR=...):
//   mem.hex        2**ADDR_BITS words            bd_mm2s.hex, bd_s2mm.hex  N_BDS BDs each
//   locks.hex      N_LOCKS initial lock values   tasks_mm2s.hex, tasks_s2mm.hex  MAX_TASKS
//   in.hex         MAX_STREAM S2MM stream words (the first n_in_words are sent)
// written by DUMP: mem_out.hex, out.hex (MAX_STREAM words, the first out_words captured from
// the MM2S stream), locks_out.hex (final lock values).
//
// Commands (four-phase handshake as in tile_harness.sv: set `cmd`, `job`, raise `cmd_valid`,
// wait for `cmd_done`, lower `cmd_valid`):
//   1 LOAD   read the job's files, reset the DUTs (4 cycles), write every BD into both channels
//            and every initial lock value through the lock unit's write port
//   2 START  queue n_tasks_* tasks on each channel, stream n_in_words into S2MM, capture the
//            MM2S stream, until every task was queued and both channels are idle (not busy),
//            or timeout_cycles pass (`timed_out`)
//   3 DUMP   read every lock value through the read port, write the three output files
module tw_dm_harness #(
    parameter int ADDR_BITS       = 12,
    parameter int WORD_BITS       = 64,
    parameter int BD_BITS         = 257,
    parameter int N_BDS           = 12,
    parameter int N_LOCKS         = 16,
    parameter int LOCK_VALUE_BITS = 6,
    parameter int MAX_TASKS       = 64,
    parameter int MAX_STREAM      = 8192
) (
    input  logic [1:0]                 cmd              /*verilator public_flat_rw*/,
    input  logic                       cmd_valid        /*verilator public_flat_rw*/,
    input  logic [31:0]                job              /*verilator public_flat_rw*/,
    input  logic [31:0]                timeout_cycles   /*verilator public_flat_rw*/,
    input  logic [31:0]                seed             /*verilator public_flat_rw*/,
    input  logic [31:0]                n_tasks_mm2s     /*verilator public_flat_rw*/,
    input  logic [31:0]                n_tasks_s2mm     /*verilator public_flat_rw*/,
    input  logic [31:0]                n_in_words       /*verilator public_flat_rw*/,
    input  logic [8:0]                 thr_out_ready    /*verilator public_flat_rw*/,
    input  logic [8:0]                 thr_in_valid     /*verilator public_flat_rw*/,
    input  logic [8:0]                 thr_rd_grant     /*verilator public_flat_rw*/,
    input  logic [8:0]                 thr_wr_grant     /*verilator public_flat_rw*/,
    output logic                       cmd_done         /*verilator public_flat_rw*/,
    output logic                       bad_cmd          /*verilator public_flat_rw*/,
    output logic                       timed_out        /*verilator public_flat_rw*/,
    output logic [31:0]                run_cycles       /*verilator public_flat_rw*/,
    output logic [31:0]                mm2s_first_busy  /*verilator public_flat_rw*/,
    output logic [31:0]                mm2s_last_busy   /*verilator public_flat_rw*/,
    output logic [31:0]                s2mm_first_busy  /*verilator public_flat_rw*/,
    output logic [31:0]                s2mm_last_busy   /*verilator public_flat_rw*/,
    output logic [31:0]                out_words        /*verilator public_flat_rw*/,
    output logic [31:0]                in_words         /*verilator public_flat_rw*/,
    output logic                       out_overflow     /*verilator public_flat_rw*/,
    output logic [15:0]                mm2s_done        /*verilator public_flat_rw*/,
    output logic [15:0]                s2mm_done        /*verilator public_flat_rw*/,
    output logic                       mm2s_busy        /*verilator public_flat_rw*/,
    output logic                       s2mm_busy        /*verilator public_flat_rw*/,
    output logic                       mm2s_error       /*verilator public_flat_rw*/,
    output logic                       s2mm_error       /*verilator public_flat_rw*/,
    output logic                       mm2s_lock_req    /*verilator public_flat_rw*/,
    output logic                       mm2s_lock_op     /*verilator public_flat_rw*/,
    output logic [5:0]                 mm2s_lock_id     /*verilator public_flat_rw*/,
    output logic [LOCK_VALUE_BITS-1:0] mm2s_lock_val    /*verilator public_flat_rw*/,
    output logic                       s2mm_lock_req    /*verilator public_flat_rw*/,
    output logic                       s2mm_lock_op     /*verilator public_flat_rw*/,
    output logic [5:0]                 s2mm_lock_id     /*verilator public_flat_rw*/,
    output logic [LOCK_VALUE_BITS-1:0] s2mm_lock_val    /*verilator public_flat_rw*/,
    output logic                       lock_overflow    /*verilator public_flat_rw*/,
    output logic                       lock_bad_id      /*verilator public_flat_rw*/,
    output logic [5:0]                 lock_error_id    /*verilator public_flat_rw*/
);
    localparam logic [1:0] CMD_LOAD  = 2'd1;
    localparam logic [1:0] CMD_START = 2'd2;
    localparam logic [1:0] CMD_DUMP  = 2'd3;
    localparam int WORDS = 1 << ADDR_BITS;
    localparam int N_INIT = (N_BDS > N_LOCKS) ? N_BDS : N_LOCKS;

    typedef enum logic [2:0] {
        S_IDLE, S_RESET, S_INIT, S_RUN, S_DUMP, S_ACK
    } state_t;

    logic clk = 1'b0;
    always #5 clk = ~clk;
    logic rst = 1'b1;

    // ---- DUT ports ------------------------------------------------------------------------
    logic                   bd_we = 1'b0;
    logic [5:0]             bd_addr = '0;
    logic [BD_BITS-1:0]     bd_wdata_m = '0, bd_wdata_s = '0;
    logic                   tm_valid, tm_ready, ts_valid, ts_ready;
    logic [5:0]             tm_payload, ts_payload;
    logic [ADDR_BITS-1:0]   rd_addr, wr_addr;
    logic                   rd_re, wr_we;
    logic [WORD_BITS-1:0]   rdata = '0, wdata;
    logic                   rd_grant = 1'b0, wr_grant = 1'b0;
    logic                   out_valid, out_ready = 1'b0;
    logic [WORD_BITS-1:0]   out_payload;
    logic                   in_valid = 1'b0, in_ready;
    logic [WORD_BITS-1:0]   in_payload = '0;
    logic                   m_gnt, s_gnt;
    logic                   lk_wr_en = 1'b0;
    logic [5:0]             lk_wr_id = '0;
    logic [LOCK_VALUE_BITS-1:0] lk_wr_value = '0, lk_rd_value;
    logic [5:0]             lk_rd_id = '0;

    tw_dm_mm2s mm2s (
        .clk(clk), .rst(rst),
        .bd_we(bd_we), .bd_addr(bd_addr), .bd_wdata(bd_wdata_m),
        .task__valid(tm_valid), .task__ready(tm_ready), .task__payload(tm_payload),
        .busy(mm2s_busy), .tasks_done(mm2s_done), .error(mm2s_error),
        .mem__addr(rd_addr), .mem__re(rd_re), .mem__ready(rd_grant), .mem__rdata(rdata),
        .o__valid(out_valid), .o__ready(out_ready), .o__payload(out_payload),
        .lock__req(mm2s_lock_req), .lock__op(mm2s_lock_op), .lock__id(mm2s_lock_id),
        .lock__val(mm2s_lock_val), .lock__gnt(m_gnt)
    );

    tw_dm_s2mm s2mm (
        .clk(clk), .rst(rst),
        .bd_we(bd_we), .bd_addr(bd_addr), .bd_wdata(bd_wdata_s),
        .task__valid(ts_valid), .task__ready(ts_ready), .task__payload(ts_payload),
        .busy(s2mm_busy), .tasks_done(s2mm_done), .error(s2mm_error),
        .mem__addr(wr_addr), .mem__we(wr_we), .mem__wdata(wdata), .mem__ready(wr_grant),
        .i__valid(in_valid), .i__ready(in_ready), .i__payload(in_payload),
        .lock__req(s2mm_lock_req), .lock__op(s2mm_lock_op), .lock__id(s2mm_lock_id),
        .lock__val(s2mm_lock_val), .lock__gnt(s_gnt)
    );

    tw_lock_unit locks (
        .clk(clk), .rst(rst),
        .ports__0__req(mm2s_lock_req), .ports__0__op(mm2s_lock_op), .ports__0__id(mm2s_lock_id),
        .ports__0__val(mm2s_lock_val), .ports__0__gnt(m_gnt),
        .ports__1__req(s2mm_lock_req), .ports__1__op(s2mm_lock_op), .ports__1__id(s2mm_lock_id),
        .ports__1__val(s2mm_lock_val), .ports__1__gnt(s_gnt),
        .wr_en(lk_wr_en), .wr_id(lk_wr_id), .wr_value(lk_wr_value),
        .rd_id(lk_rd_id), .rd_value(lk_rd_value),
        .overflow(lock_overflow), .bad_id(lock_bad_id), .error_id(lock_error_id),
        .clear(1'b0)
    );

    // ---- images ---------------------------------------------------------------------------
    logic [WORD_BITS-1:0]       mem      [WORDS];
    logic [BD_BITS-1:0]         bd_m_img [N_BDS];
    logic [BD_BITS-1:0]         bd_s_img [N_BDS];
    logic [LOCK_VALUE_BITS-1:0] lock_img [N_LOCKS];
    logic [LOCK_VALUE_BITS-1:0] lock_out [N_LOCKS];
    logic [5:0]                 tm_img   [MAX_TASKS];
    logic [5:0]                 ts_img   [MAX_TASKS];
    logic [WORD_BITS-1:0]       in_img   [MAX_STREAM];
    logic [WORD_BITS-1:0]       out_img  [MAX_STREAM];

    string dir;
    initial begin
        if (!$value$plusargs("TW_DIR=%s", dir)) dir = ".";
        cmd_done = 1'b0;
        bad_cmd = 1'b0;
        timed_out = 1'b0;
        run_cycles = '0;
        out_words = '0;
        in_words = '0;
        out_overflow = 1'b0;
        mm2s_first_busy = '0;
        mm2s_last_busy = '0;
        s2mm_first_busy = '0;
        s2mm_last_busy = '0;
    end

    // ---- pseudo-random sources ------------------------------------------------------------
    function automatic logic [31:0] xorshift(input logic [31:0] x);
        logic [31:0] y;
        y = x ^ (x << 13);
        y = y ^ (y >> 17);
        return y ^ (y << 5);
    endfunction

    function automatic logic [31:0] seeded(input logic [31:0] s, input logic [31:0] k);
        logic [31:0] y;
        y = xorshift(xorshift(s ^ k) ^ 32'h9e3779b9);
        return (y == 0) ? 32'h1 : y;
    endfunction

    logic [31:0] r_out = 1, r_in = 1, r_rd = 1, r_wr = 1, r_junk = 1;
    function automatic logic on(input logic [31:0] r, input logic [8:0] thr);
        return {1'b0, r[31:24]} < thr;
    endfunction

    // ---- the task queues and the streams ----------------------------------------------------
    logic [31:0] tm_idx = '0, ts_idx = '0;
    logic        running;
    assign running    = (state == S_RUN);
    assign tm_valid   = running && (tm_idx < n_tasks_mm2s);
    assign ts_valid   = running && (ts_idx < n_tasks_s2mm);
    assign tm_payload = tm_img[tm_idx[$clog2(MAX_TASKS)-1:0]];
    assign ts_payload = ts_img[ts_idx[$clog2(MAX_TASKS)-1:0]];

    state_t      state = S_RESET;
    logic [31:0] idx = '0;
    logic [31:0] in_next;

    always @(posedge clk) begin
        bd_we <= 1'b0;
        lk_wr_en <= 1'b0;
        r_junk <= xorshift(r_junk);

        // memory: one read port, one write port
        if (rd_re && rd_grant) rdata <= mem[rd_addr];
        else rdata <= {(WORD_BITS + 31) / 32{r_junk}};
        if (wr_we && wr_grant) mem[wr_addr] <= wdata;

        case (state)
            S_RESET: begin  // power-up reset of the DUTs
                rst <= 1'b1;
                idx <= idx + 1;
                if (idx == 3) begin
                    rst <= 1'b0;
                    idx <= '0;
                    state <= S_IDLE;
                end
            end
            S_IDLE: begin
                if (cmd_valid && !cmd_done) begin
                    idx <= '0;
                    bad_cmd <= 1'b0;
                    case (cmd)
                        CMD_LOAD: begin
                            $readmemh($sformatf("%s/job%0d/mem.hex", dir, job), mem);
                            $readmemh($sformatf("%s/job%0d/bd_mm2s.hex", dir, job), bd_m_img);
                            $readmemh($sformatf("%s/job%0d/bd_s2mm.hex", dir, job), bd_s_img);
                            $readmemh($sformatf("%s/job%0d/locks.hex", dir, job), lock_img);
                            $readmemh($sformatf("%s/job%0d/tasks_mm2s.hex", dir, job), tm_img);
                            $readmemh($sformatf("%s/job%0d/tasks_s2mm.hex", dir, job), ts_img);
                            $readmemh($sformatf("%s/job%0d/in.hex", dir, job), in_img);
                            rst <= 1'b1;
                            state <= S_INIT;
                        end
                        CMD_START: begin
                            timed_out <= 1'b0;
                            run_cycles <= '0;
                            out_words <= '0;
                            in_words <= '0;
                            out_overflow <= 1'b0;
                            tm_idx <= '0;
                            ts_idx <= '0;
                            mm2s_first_busy <= 32'hffff_ffff;
                            s2mm_first_busy <= 32'hffff_ffff;
                            mm2s_last_busy <= '0;
                            s2mm_last_busy <= '0;
                            r_out <= seeded(seed, 32'h1);
                            r_in <= seeded(seed, 32'h2);
                            r_rd <= seeded(seed, 32'h3);
                            r_wr <= seeded(seed, 32'h4);
                            r_junk <= seeded(seed, 32'h5);
                            in_valid <= 1'b0;
                            out_ready <= 1'b0;
                            rd_grant <= 1'b0;
                            wr_grant <= 1'b0;
                            state <= S_RUN;
                        end
                        CMD_DUMP: state <= S_DUMP;
                        default: begin
                            bad_cmd <= 1'b1;
                            cmd_done <= 1'b1;
                            state <= S_ACK;
                        end
                    endcase
                end
            end
            S_INIT: begin  // 4 cycles of reset, then N_INIT cycles of BD and lock writes
                idx <= idx + 1;
                if (idx == 3) rst <= 1'b0;
                if (idx >= 4) begin
                    if (idx - 4 < N_BDS) begin
                        bd_we <= 1'b1;
                        bd_addr <= 6'(idx - 4);
                        bd_wdata_m <= bd_m_img[idx - 4];
                        bd_wdata_s <= bd_s_img[idx - 4];
                    end
                    if (idx - 4 < N_LOCKS) begin
                        lk_wr_en <= 1'b1;
                        lk_wr_id <= 6'(idx - 4);
                        lk_wr_value <= lock_img[idx - 4];
                    end
                    if (idx - 4 == N_INIT) begin
                        cmd_done <= 1'b1;
                        state <= S_ACK;
                    end
                end
            end
            S_RUN: begin
                run_cycles <= run_cycles + 1;
                r_out <= xorshift(r_out);
                r_in <= xorshift(r_in);
                r_rd <= xorshift(r_rd);
                r_wr <= xorshift(r_wr);
                out_ready <= on(r_out, thr_out_ready);
                rd_grant <= on(r_rd, thr_rd_grant);
                wr_grant <= on(r_wr, thr_wr_grant);
                if (mm2s_busy) begin
                    if (mm2s_first_busy == 32'hffff_ffff) mm2s_first_busy <= run_cycles;
                    mm2s_last_busy <= run_cycles;
                end
                if (s2mm_busy) begin
                    if (s2mm_first_busy == 32'hffff_ffff) s2mm_first_busy <= run_cycles;
                    s2mm_last_busy <= run_cycles;
                end
                if (tm_valid && tm_ready) tm_idx <= tm_idx + 1;
                if (ts_valid && ts_ready) ts_idx <= ts_idx + 1;
                // MM2S stream capture
                if (out_valid && out_ready) begin
                    if (out_words < MAX_STREAM) out_img[out_words] <= out_payload;
                    else out_overflow <= 1'b1;
                    out_words <= out_words + 1;
                end
                // S2MM stream source: valid is held until the word is taken
                in_next = in_words + {31'b0, in_valid && in_ready};
                in_words <= in_next;
                if (!in_valid || in_ready) begin
                    in_valid <= (in_next < n_in_words) && on(r_in, thr_in_valid);
                    in_payload <= in_img[in_next[$clog2(MAX_STREAM)-1:0]];
                end
                if (tm_idx == n_tasks_mm2s && ts_idx == n_tasks_s2mm && !mm2s_busy
                        && !s2mm_busy && run_cycles > 2) begin
                    in_valid <= 1'b0;
                    out_ready <= 1'b0;
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end else if (run_cycles >= timeout_cycles) begin
                    in_valid <= 1'b0;
                    out_ready <= 1'b0;
                    timed_out <= 1'b1;
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end
            end
            S_DUMP: begin  // lock values through the read port (one per cycle), then the files
                lk_rd_id <= 6'(idx);
                if (idx >= 1 && idx <= N_LOCKS) lock_out[idx - 1] <= lk_rd_value;
                idx <= idx + 1;
                if (idx == N_LOCKS + 1) begin
                    $writememh($sformatf("%s/job%0d/mem_out.hex", dir, job), mem);
                    $writememh($sformatf("%s/job%0d/out.hex", dir, job), out_img);
                    $writememh($sformatf("%s/job%0d/locks_out.hex", dir, job), lock_out);
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end
            end
            S_ACK: begin
                if (!cmd_valid) begin
                    cmd_done <= 1'b0;
                    state <= S_IDLE;
                end
            end
            default: state <= S_IDLE;
        endcase
    end

endmodule
