`timescale 1ns/1ps
// tw_overlay_harness: Verilator harness around a generated overlay (`tw_overlay`) with the
// DDR simulation model.
//
// The clock is generated here, so the simulator runs free between commands and Python
// (tilewright.sim.overlay_tb) only waits for `cmd_done`. Everything bulk moves through files.
// Files of job N live in "<TW_DIR>/jobN/" (plusarg +TW_DIR=..., default "."):
//   cfg.hex      configuration records, REC_BITS wide (hex), ended by a record of kind 15:
//                {kind[3:0], unit[7:0], ch[3:0], addr[15:0], data[CFG_BITS-1:0]}
//   ddr.hex      the DDR image, WORD_BITS/4 hex digits a line from word 0 ($readmemh;
//                the rest of the DDR is zero)
//   ddr_out.hex  written by DUMP_DDR: words dump_lo .. dump_hi
//   status.hex   written by STATUS: st_data of every unit (tiles r*C+c, then shims)
//
// Commands (four-phase handshake on cmd/cmd_valid/cmd_done, as the tile harness):
//   1 LOAD_CFG  stream cfg.hex into the overlay's configuration port (one record per cycle,
//               each held until cfg_ready)
//   2 LOAD_DDR  clear the DDR and $readmemh ddr.hex into it (no simulated cycles)
//   3 START     pulse start; run until `done`, or until nothing has moved for
//               `watchdog_cycles` (`stalled`), or `timeout_cycles` have passed (`timed_out`)
//   4 DUMP_DDR  $writememh words dump_lo .. dump_hi to ddr_out.hex
//   5 RESET     hold rst for 4 cycles
//   6 STATUS    read every unit's status word into status.hex
//
// DDR model, per channel (docs/architecture.md, "DDR model"): a read or write port grants at
// most one word every WORD_BYTES / BYTES_PER_CYCLE cycles (the configured bandwidth); a read
// that a channel marks `new` (the first read of a datamover task) is granted LATENCY cycles
// after it is first requested. Read data arrive the cycle after the grant, as the
// datamover's memory port expects. Counters: words read and written during the last START.
module tw_overlay_harness #(
    parameter int NRD = 2,
    parameter int NWR = 2,
    parameter int NUNITS = 2,
    parameter int WORD_BITS = 64,
    parameter int CFG_BITS = 257,
    parameter int DDR_WORDS_LOG2 = 20,
    parameter int INTERVAL = 2,
    parameter int LATENCY = 64,
    parameter int CFG_MAX = 65536
) (
    input  logic [2:0]  cmd             /*verilator public_flat_rw*/,
    input  logic        cmd_valid       /*verilator public_flat_rw*/,
    input  logic [31:0] job             /*verilator public_flat_rw*/,
    input  logic [31:0] timeout_cycles  /*verilator public_flat_rw*/,
    input  logic [31:0] watchdog_cycles /*verilator public_flat_rw*/,
    input  logic [31:0] dump_lo         /*verilator public_flat_rw*/,
    input  logic [31:0] dump_hi         /*verilator public_flat_rw*/,
    output logic        cmd_done        /*verilator public_flat_rw*/,
    output logic        bad_cmd         /*verilator public_flat_rw*/,
    output logic        timed_out       /*verilator public_flat_rw*/,
    output logic        stalled         /*verilator public_flat_rw*/,
    output logic        ddr_oob         /*verilator public_flat_rw*/,
    output logic [31:0] run_cycles      /*verilator public_flat_rw*/,
    output logic [31:0] cycles          /*verilator public_flat_rw*/,
    output logic [31:0] rd_words        /*verilator public_flat_rw*/,
    output logic [31:0] wr_words        /*verilator public_flat_rw*/,
    output logic [31:0] cfg_records     /*verilator public_flat_rw*/,
    output logic        done            /*verilator public_flat_rw*/,
    output logic        error           /*verilator public_flat_rw*/
);
    localparam int AB = 28;
    localparam int REC_BITS = 32 + CFG_BITS;
    localparam int DDR_WORDS = 1 << DDR_WORDS_LOG2;
    localparam logic [2:0] CMD_LOAD_CFG = 3'd1;
    localparam logic [2:0] CMD_LOAD_DDR = 3'd2;
    localparam logic [2:0] CMD_START    = 3'd3;
    localparam logic [2:0] CMD_DUMP_DDR = 3'd4;
    localparam logic [2:0] CMD_RESET    = 3'd5;
    localparam logic [2:0] CMD_STATUS   = 3'd6;

    typedef enum logic [3:0] {
        S_RESET, S_IDLE, S_CFG, S_START, S_RUN, S_STATUS, S_ACK
    } state_t;

    logic clk = 1'b0;
    always #5 clk = ~clk;
    state_t state = S_RESET;

    logic                 rst = 1'b1;
    logic                 start = 1'b0;
    logic                 cfg_we = 1'b0;
    logic [7:0]           cfg_unit = '0;
    logic [2:0]           cfg_kind = '0;
    logic [3:0]           cfg_ch = '0;
    logic [15:0]          cfg_addr = '0;
    logic [CFG_BITS-1:0]  cfg_data = '0;
    logic                 cfg_ready;
    logic                 busy, progress;
    logic [7:0]           st_sel = '0;
    logic [127:0]         st_data;
    logic [NRD*AB-1:0]        rd_addr;
    logic [NRD-1:0]           rd_re, rd_new, rd_ready;
    logic [NRD*WORD_BITS-1:0] rd_rdata;
    logic [NWR*AB-1:0]        wr_addr;
    logic [NWR-1:0]           wr_we, wr_ready;
    logic [NWR*WORD_BITS-1:0] wr_wdata;

    tw_overlay dut (
        .clk(clk), .rst(rst),
        .cfg_we(cfg_we), .cfg_unit(cfg_unit), .cfg_kind(cfg_kind), .cfg_ch(cfg_ch),
        .cfg_addr(cfg_addr), .cfg_data(cfg_data), .cfg_ready(cfg_ready),
        .start(start), .done(done), .busy(busy), .error(error), .cycles(cycles),
        .st_sel(st_sel), .st_data(st_data), .progress(progress),
        .ddr_rd_addr(rd_addr), .ddr_rd_re(rd_re), .ddr_rd_new(rd_new),
        .ddr_rd_ready(rd_ready), .ddr_rd_rdata(rd_rdata),
        .ddr_wr_addr(wr_addr), .ddr_wr_we(wr_we), .ddr_wr_wdata(wr_wdata),
        .ddr_wr_ready(wr_ready)
    );

    // ---- DDR model ---------------------------------------------------------------------------
    logic [WORD_BITS-1:0] ddr [DDR_WORDS];
    logic [15:0] rgap [NRD];
    logic [15:0] rlat [NRD];
    logic        rarmed [NRD];
    logic [15:0] wgap [NWR];
    logic        counting = 1'b0;

    for (genvar i = 0; i < NRD; i++) begin : g_rd
        wire pending = rarmed[i] ? (rlat[i] != 16'd0) : (LATENCY != 0);
        assign rd_ready[i] = rd_re[i] && rgap[i] == 16'd0 && !(rd_new[i] && pending);
        always @(posedge clk) begin
            if (rst) begin
                rgap[i] <= '0;
                rlat[i] <= '0;
                rarmed[i] <= 1'b0;
            end else begin
                if (rd_re[i] && rd_ready[i]) begin
                    rd_rdata[i*WORD_BITS +: WORD_BITS] <=
                        ddr[rd_addr[i*AB +: DDR_WORDS_LOG2]];
                    rgap[i] <= 16'(INTERVAL - 1);
                end else if (rgap[i] != 16'd0) begin
                    rgap[i] <= rgap[i] - 16'd1;
                end
                if (!rd_new[i]) begin
                    rarmed[i] <= 1'b0;
                end else if (rd_re[i] && !rarmed[i]) begin
                    rarmed[i] <= 1'b1;
                    rlat[i] <= (LATENCY > 0) ? 16'(LATENCY - 1) : 16'd0;
                end else if (rlat[i] != 16'd0) begin
                    rlat[i] <= rlat[i] - 16'd1;
                end
            end
        end
    end
    for (genvar i = 0; i < NWR; i++) begin : g_wr
        assign wr_ready[i] = wr_we[i] && wgap[i] == 16'd0;
        always @(posedge clk) begin
            if (rst) begin
                wgap[i] <= '0;
            end else if (wr_we[i] && wr_ready[i]) begin
                ddr[wr_addr[i*AB +: DDR_WORDS_LOG2]] <= wr_wdata[i*WORD_BITS +: WORD_BITS];
                wgap[i] <= 16'(INTERVAL - 1);
            end else if (wgap[i] != 16'd0) begin
                wgap[i] <= wgap[i] - 16'd1;
            end
        end
    end

    // traffic counters and out-of-range accesses
    always @(posedge clk) begin
        if (state == S_START) begin
            rd_words <= '0;
            wr_words <= '0;
            ddr_oob <= 1'b0;
        end else begin
            rd_words <= rd_words + 32'($countones(rd_re & rd_ready));
            wr_words <= wr_words + 32'($countones(wr_we & wr_ready));
            for (int i = 0; i < NRD; i++)
                if (rd_re[i] && (rd_addr[i*AB +: AB] >> DDR_WORDS_LOG2) != 0) ddr_oob <= 1'b1;
            for (int i = 0; i < NWR; i++)
                if (wr_we[i] && (wr_addr[i*AB +: AB] >> DDR_WORDS_LOG2) != 0) ddr_oob <= 1'b1;
        end
    end

    // ---- command FSM ---------------------------------------------------------------------
    logic [REC_BITS-1:0] cfg_img [CFG_MAX];
    logic [127:0]        st_img [NUNITS];

    string dir;
    initial begin
        if (!$value$plusargs("TW_DIR=%s", dir)) dir = ".";
    end

    logic [31:0] idx = '0;
    logic [31:0] quiet = '0;
    logic        reset_cmd = 1'b0;
    logic        seen_busy = 1'b0;

    initial begin
        cmd_done = 1'b0;
        bad_cmd = 1'b0;
        timed_out = 1'b0;
        stalled = 1'b0;
        run_cycles = '0;
        cfg_records = '0;
    end

    always @(posedge clk) begin
        start <= 1'b0;
        case (state)
            S_RESET: begin
                rst <= 1'b1;
                idx <= idx + 1;
                if (idx == 3) begin
                    rst <= 1'b0;
                    idx <= '0;
                    if (reset_cmd) begin
                        reset_cmd <= 1'b0;
                        cmd_done <= 1'b1;
                        state <= S_ACK;
                    end else begin
                        state <= S_IDLE;
                    end
                end
            end
            S_IDLE: begin
                if (cmd_valid && !cmd_done) begin
                    idx <= '0;
                    bad_cmd <= 1'b0;
                    case (cmd)
                        CMD_LOAD_CFG: begin
                            for (int i = 0; i < CFG_MAX; i++) cfg_img[i] = '1;
                            $readmemh($sformatf("%s/job%0d/cfg.hex", dir, job), cfg_img);
                            cfg_records <= '0;
                            state <= S_CFG;
                        end
                        CMD_LOAD_DDR: begin
                            for (int i = 0; i < DDR_WORDS; i++) ddr[i] = '0;
                            $readmemh($sformatf("%s/job%0d/ddr.hex", dir, job), ddr);
                            cmd_done <= 1'b1;
                            state <= S_ACK;
                        end
                        CMD_START: begin
                            timed_out <= 1'b0;
                            stalled <= 1'b0;
                            state <= S_START;
                        end
                        CMD_DUMP_DDR: begin
                            $writememh($sformatf("%s/job%0d/ddr_out.hex", dir, job), ddr,
                                       dump_lo, dump_hi);
                            cmd_done <= 1'b1;
                            state <= S_ACK;
                        end
                        CMD_RESET: begin
                            reset_cmd <= 1'b1;
                            state <= S_RESET;
                        end
                        CMD_STATUS: begin
                            st_sel <= '0;
                            state <= S_STATUS;
                        end
                        default: begin
                            bad_cmd <= 1'b1;
                            cmd_done <= 1'b1;
                            state <= S_ACK;
                        end
                    endcase
                end
            end
            S_CFG: begin
                // present record idx; it is taken in a cycle with cfg_we & cfg_ready
                if (cfg_we && !cfg_ready) begin
                    // hold
                end else begin
                    if (cfg_we) cfg_records <= cfg_records + 1;
                    if (cfg_img[idx][REC_BITS-1 -: 4] == 4'hF || idx == CFG_MAX) begin
                        cfg_we <= 1'b0;
                        cmd_done <= 1'b1;
                        state <= S_ACK;
                    end else begin
                        cfg_we <= 1'b1;
                        cfg_kind <= cfg_img[idx][REC_BITS-2 -: 3];
                        cfg_unit <= cfg_img[idx][REC_BITS-5 -: 8];
                        cfg_ch <= cfg_img[idx][REC_BITS-13 -: 4];
                        cfg_addr <= cfg_img[idx][REC_BITS-17 -: 16];
                        cfg_data <= cfg_img[idx][CFG_BITS-1:0];
                        idx <= idx + 1;
                    end
                end
            end
            S_START: begin
                start <= 1'b1;
                run_cycles <= '0;
                quiet <= '0;
                seen_busy <= 1'b0;
                state <= S_RUN;
            end
            S_RUN: begin
                run_cycles <= run_cycles + 1;
                if (busy) seen_busy <= 1'b1;
                quiet <= progress ? 32'd0 : quiet + 1;
                if (seen_busy && done) begin
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end else if (quiet >= watchdog_cycles) begin
                    stalled <= 1'b1;
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end else if (run_cycles >= timeout_cycles) begin
                    timed_out <= 1'b1;
                    cmd_done <= 1'b1;
                    state <= S_ACK;
                end
            end
            S_STATUS: begin
                // st_data is combinational from st_sel
                st_img[st_sel] <= st_data;
                if (32'(st_sel) == NUNITS - 1) begin
                    state <= S_ACK;
                    cmd_done <= 1'b1;
                end
                st_sel <= st_sel + 1;
            end
            S_ACK: begin
                if (state == S_ACK && st_sel != 0 && cmd == CMD_STATUS) begin
                    $writememh($sformatf("%s/job%0d/status.hex", dir, job), st_img);
                    st_sel <= '0;
                end
                if (!cmd_valid) begin
                    cmd_done <= 1'b0;
                    state <= S_IDLE;
                end
            end
            default: state <= S_IDLE;
        endcase
    end
endmodule
