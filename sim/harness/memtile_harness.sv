// Harness of one memtile (tw_memtile with 2 S2MM + 2 MM2S channels, as the overlay builds it)
// for the cocotb regression of sim/memtile_tb.py: the clock runs here; Python drives the
// configuration ports and both streams' handshakes cycle by cycle (short jobs only).
`timescale 1ns/1ps
module tw_memtile_harness #(
    parameter int WB  = 32,      // stream word bits (8 x block)
    parameter int AB  = 13,      // memory word address bits (dm_addr)
    parameter int BDW = 257,     // BD bits
    parameter int TB  = 10       // task payload bits
) (
    output logic            clk           /*verilator public_flat_rw*/,
    input  logic            rst           /*verilator public_flat_rw*/,
    input  logic            bd_we         /*verilator public_flat_rw*/,
    input  logic [3:0]      bd_ch         /*verilator public_flat_rw*/,
    input  logic [5:0]      bd_addr       /*verilator public_flat_rw*/,
    input  logic [BDW-1:0]  bd_wdata      /*verilator public_flat_rw*/,
    input  logic            task_valid    /*verilator public_flat_rw*/,
    input  logic [TB-1:0]   task_payload  /*verilator public_flat_rw*/,
    output logic            task_ready    /*verilator public_flat_rw*/,
    input  logic            lock_wr_en    /*verilator public_flat_rw*/,
    input  logic [5:0]      lock_wr_id    /*verilator public_flat_rw*/,
    input  logic [5:0]      lock_wr_value /*verilator public_flat_rw*/,
    input  logic [1:0]      s_valid       /*verilator public_flat_rw*/,
    input  logic [2*WB-1:0] s_payload     /*verilator public_flat_rw*/,
    output logic [1:0]      s_ready       /*verilator public_flat_rw*/,
    output logic [1:0]      m_valid       /*verilator public_flat_rw*/,
    output logic [2*WB-1:0] m_payload     /*verilator public_flat_rw*/,
    input  logic [1:0]      m_ready       /*verilator public_flat_rw*/,
    output logic [3:0]      dma_busy      /*verilator public_flat_rw*/,
    output logic            dma_error     /*verilator public_flat_rw*/
);
    initial clk = 1'b0;
    always #5 clk = ~clk;

    logic [WB-1:0] dm_rdata_unused;
    logic          dm_ready_unused;

    tw_memtile dut (
        .clk(clk), .rst(rst),
        .bd_we(bd_we), .bd_ch(bd_ch), .bd_addr(bd_addr), .bd_wdata(bd_wdata),
        .task__valid(task_valid), .task__payload(task_payload), .task__ready(task_ready),
        .lock_wr_en(lock_wr_en), .lock_wr_id(lock_wr_id), .lock_wr_value(lock_wr_value),
        .s2mm__0__valid(s_valid[0]), .s2mm__0__payload(s_payload[WB-1:0]),
        .s2mm__0__ready(s_ready[0]),
        .s2mm__1__valid(s_valid[1]), .s2mm__1__payload(s_payload[2*WB-1:WB]),
        .s2mm__1__ready(s_ready[1]),
        .mm2s__0__valid(m_valid[0]), .mm2s__0__payload(m_payload[WB-1:0]),
        .mm2s__0__ready(m_ready[0]),
        .mm2s__1__valid(m_valid[1]), .mm2s__1__payload(m_payload[2*WB-1:WB]),
        .mm2s__1__ready(m_ready[1]),
        .dma_busy(dma_busy), .dma_error(dma_error),
        .dm_we(1'b0), .dm_re(1'b0), .dm_addr('0), .dm_wdata('0),
        .dm_rdata(dm_rdata_unused), .dm_ready(dm_ready_unused)
    );
endmodule
